"""The decoder's inputs of a prompt: token embeddings, or a VLM's merged text + image embeddings.

A vision-language model builds its decoder inputs itself: it encodes the images, projects them,
scatters them over the image placeholder tokens and (Qwen2-VL) computes 3-D M-RoPE positions.
Rather than re-implement that per family and per transformers version, the model's own forward
runs up to the call of its language model, whose inputs are captured there; the language model
itself never runs. DASH then prefills the decoder from those inputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dash_prefill.hf.adapters import PreNormAdapter
from dash_prefill.core.config import DashConfig
from dash_prefill.core.policy import protected_mask

# Keyword arguments a VLM's forward takes besides input_ids and attention_mask.
MULTIMODAL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                     "second_per_grid_ts", "mm_token_type_ids", "token_type_ids", "image_sizes")


@dataclass(frozen=True)
class PromptInputs:
    """What the decoder layers start from: embeddings and where each token sits.

    embeds : (batch, seq, hidden)
    rope : (batch, seq) or (3, batch, seq) LongTensor or None
        Rotary positions (M-RoPE's temporal/height/width rows); None = sequence positions.
    blocks : (batch, seq) LongTensor or None
        Bidirectional blocks (Gemma-3 image tokens; -1 elsewhere), see ``cache.KeyLayout``.
    image : (batch, seq) BoolTensor or None
        Image/video tokens, the tokens ``DashConfig(eligible="image")`` may halt.
    """

    embeds: torch.Tensor
    rope: torch.Tensor | None = None
    blocks: torch.Tensor | None = None
    image: torch.Tensor | None = None


class _Captured(Exception):
    """Raised by the hook on the language model: its inputs are all we need."""


def prompt_inputs(adapter: PreNormAdapter, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  multimodal: dict, vision_config: DashConfig | None = None) -> PromptInputs:
    """The decoder inputs of ``input_ids`` (and images, for a VLM).

    Parameters
    ----------
    adapter : the model's adapter (``adapter.multimodal`` tells a VLM).
    input_ids : (batch, seq) LongTensor, with the processor's image placeholder tokens.
    attention_mask : (batch, seq) or None.
    multimodal : dict
        The processor's other outputs (``pixel_values``, ``image_grid_thw``,
        ``mm_token_type_ids``, ``token_type_ids``, ...); must be empty for a text model.
    vision_config : DashConfig, optional
        Halting inside the vision encoder (see :mod:`dash_prefill.hf.vision`).
    """
    unknown = sorted(set(multimodal) - set(MULTIMODAL_INPUTS))
    if unknown:
        raise ValueError(f"unexpected inputs {unknown}; multimodal inputs are {', '.join(MULTIMODAL_INPUTS)}")
    model = adapter.model
    device = adapter.device
    if not adapter.multimodal:
        if multimodal or vision_config is not None:
            given = sorted(multimodal) + (["vision_config"] if vision_config is not None else [])
            raise ValueError(f"{type(model).__name__} is a text model: it takes no {', '.join(given)}")
        return PromptInputs(adapter.embed(input_ids))

    input_ids = input_ids.to(device)
    captured: dict = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)
        raise _Captured

    handle = adapter.base.register_forward_pre_hook(hook, with_kwargs=True)
    halting = contextlib.nullcontext()
    if vision_config is not None and vision_config.scores_tokens:
        from dash_prefill.hf.vision import halted_vision
        halting = halted_vision(model, vision_config)
    try:
        with halting:
            model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                        **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in multimodal.items()})
    except _Captured:
        pass
    except (TypeError, ValueError, AttributeError, IndexError, RuntimeError) as error:
        raise ValueError(
            f"{type(model).__name__} could not build its inputs from {sorted(multimodal) or 'input_ids alone'}: "
            f"{error}. Pass the processor's whole output (input_ids with its image placeholder tokens, "
            "pixel_values and, for Qwen2-VL, image_grid_thw and mm_token_type_ids)") from error
    finally:
        handle.remove()
    if "inputs_embeds" not in captured:
        raise RuntimeError(f"{type(model).__name__} did not call its language model; unsupported version?")
    rope = captured.get("position_ids")
    if rope is not None and rope.dim() == 3 and rope.shape[0] == 4:
        rope = rope[1:]  # Qwen2-VL may prepend the text positions to the three M-RoPE rows
    return PromptInputs(captured["inputs_embeds"], rope, _image_blocks(model, multimodal),
                        _image_tokens(model.config, input_ids))


def _image_tokens(config, input_ids: torch.Tensor) -> torch.Tensor | None:
    ids = {getattr(config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id")}
    ids.discard(None)
    if not ids:
        return None
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in ids:  # comparisons with Python ints: no host-to-device copy
        mask |= input_ids == token
    return mask


def _image_blocks(model, multimodal: dict) -> torch.Tensor | None:
    """Gemma-3: each run of image tokens (token_type_ids == 1) is one bidirectional block."""
    token_types = multimodal.get("token_type_ids")
    if model.config.model_type != "gemma3" or token_types is None:
        return None
    is_image = token_types == 1
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(-1) - 1, -1)


def eligible_tokens(config: DashConfig, prompt: PromptInputs, padding_mask: torch.Tensor | None
                    ) -> tuple[torch.Tensor, list[int]] | None:
    """For ``eligible="image"``: the image tokens that may halt and their count per row.

    One host sync, before any layer runs. None for ``eligible="all"``.
    """
    if config.eligible == "all" or not config.scores_tokens:
        return None
    if prompt.image is None:
        raise ValueError("eligible='image' halts only image tokens, and this model has none: use a "
                         "vision-language model with the processor's pixel_values, or eligible='all'")
    batch, seq_len = prompt.image.shape
    padding = None if padding_mask is None else ~padding_mask.to(prompt.image.device)
    protect = protected_mask(padding, batch, seq_len, config.protect_first, config.protect_last,
                             prompt.image.device)
    mask = prompt.image & ~protect
    images, counts = torch.stack([prompt.image.sum(-1), mask.sum(-1)]).tolist()
    if sum(images) == 0:
        raise ValueError("eligible='image' halts only image tokens and this prompt has none: pass the "
                         "processor's pixel_values (and its other outputs) or use eligible='all'")
    return mask, counts

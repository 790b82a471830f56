"""DASH inside the vision encoder of a VLM: halt patch tokens after a start layer.

The same rule as in the language model (Chen et al., arXiv 2604.18103, the ViT variant):
layers before the start layer run on every patch token; at the start layer each image's
tokens are scored by ||U_t|| (the attention sublayer output before the residual add); the top
(1-ρ) of each image stay active, the rest halt. Later layers run on the active tokens only,
and active tokens attend only to active tokens of their own image (or window).

Unlike the language model, a halted token's last hidden state IS read (by the post-layernorm,
the projector, Qwen's PatchMerger, ``hidden_states[k]``). So each later layer writes its
active tokens back into a full-length tensor in which halted tokens keep their output of the
start layer (frozen); everything around the encoder sees the full sequence in the original order.

Choices where the text-side config does not carry over:
- The start layer runs on every token: a halted token's frozen state is a whole layer's
  output, and ``hidden_states[start + 1]`` equals plain.
- ``protect_first`` / ``protect_last`` are ignored (they protect attention sinks and the
  question of a text prompt; a ViT has neither). CLIP's class token is always kept: CLIP pools
  it and Llava drops it by position. SigLIP and Qwen have no class token.
- Halting counts are per image for CLIP/SigLIP and per frame (per attention segment of the
  full-attention blocks) for Qwen2-VL/Qwen2.5-VL: kept_count(n, ρ, 0) of n eligible tokens.
- Policies "dash" (with score "absolute" or "relative") and "random"; "attention" (attention
  received from the last prompt tokens) has no meaning in an encoder and is refused.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from dash_prefill.core.config import DashConfig
from dash_prefill.core.policy import Eligibility, delta_norm, kept_count, random_scores

logger = logging.getLogger(__name__)

SUPPORTED = ("CLIPVisionModel (Llava)", "SiglipVisionModel (Gemma 3)",
             "Qwen2VisionTransformerPretrainedModel (Qwen2-VL)",
             "Qwen2_5_VisionTransformerPretrainedModel (Qwen2.5-VL)")


@dataclass(frozen=True)
class VisionSelection:
    """The active tokens chosen in one forward of the vision tower.

    Attributes
    ----------
    active_index : LongTensor
        CLIP/SigLIP: (images, kept), ascending indices into each image's tokens (CLS is 0).
        Qwen: (kept_total,), ascending indices into the packed sequence in the order the blocks
        see it (Qwen2.5-VL: window order).
    scores : float32, (images, tokens) or (tokens,)
        The policy's scores at the start layer.
    tokens_per_image, kept_per_image : list[int]
        Per image (Qwen: per frame), class token included.
    """

    active_index: torch.Tensor
    scores: torch.Tensor
    tokens_per_image: list[int]
    kept_per_image: list[int]

    @property
    def halted_per_image(self) -> list[int]:
        return [n - k for n, k in zip(self.tokens_per_image, self.kept_per_image)]


@dataclass
class VisionHalting:
    """What :func:`halted_vision` yields: where it halts, and one selection per tower forward."""

    family: str
    start_layer: int
    num_layers: int
    selections: list[VisionSelection] = field(default_factory=list)


class _Call:
    """One forward of the tower: its frames (Qwen), then the active set and compacted inputs."""

    def __init__(self, frames: list[int] | None):
        self.frames = frames
        self.index: torch.Tensor | None = None
        self.cached: dict[int, tuple] = {}  # id(input) -> (input, compacted): built once per call

    def once(self, source, build):
        if id(source) not in self.cached:
            self.cached[id(source)] = (source, build(source))
        return self.cached[id(source)][1]


class _Batched:
    """CLIP / SigLIP: hidden states (images, tokens, dim); all images have the same tokens."""

    attention = "self_attn"

    def __init__(self, name: str, class_token: bool):
        self.name, self.class_token = name, class_token

    def layers(self, tower: nn.Module) -> nn.ModuleList:
        return getattr(tower, "vision_model", tower).encoder.layers

    def frames(self, arguments: dict) -> None:
        return None  # known from the hidden states' shape

    def select(self, scores: torch.Tensor, frames, halt_ratio: float):
        images, tokens = scores.shape
        protected = torch.zeros_like(scores, dtype=torch.bool)
        protected[:, 0] = self.class_token  # CLIP pools its class token; SigLIP has none
        kept = int(self.class_token) + kept_count(tokens - int(self.class_token), halt_ratio, 0)
        selection = Eligibility(protected, None, [kept] * images).select(scores)
        return selection.index, [tokens] * images, [kept] * images

    def random(self, hidden: torch.Tensor, seed: int) -> torch.Tensor:
        return random_scores(hidden.shape[0], hidden.shape[1], seed, hidden.device)

    def run_active(self, forward, hidden: torch.Tensor, args, kwargs, call: _Call) -> torch.Tensor:
        """Run a layer on the active tokens; halted rows of ``hidden`` pass through unchanged."""
        mask = args[0] if args else kwargs.get("attention_mask")
        if mask is not None:
            raise ValueError("halted_vision does not support an attention mask inside the vision encoder")
        slots = call.index.to(hidden.device)[:, :, None].expand(-1, -1, hidden.shape[-1])
        active = forward(hidden.gather(1, slots), *args, **kwargs)
        return hidden.scatter(1, slots, active)


class _Packed:
    """Qwen2-VL / Qwen2.5-VL: hidden states (tokens, dim) of every image packed in one sequence;
    attention runs within the segments of ``cu_seqlens`` (frames, or windows in Qwen2.5-VL)."""

    attention = "attn"

    def __init__(self, name: str):
        self.name = name

    def layers(self, tower: nn.Module) -> nn.ModuleList:
        return tower.blocks

    def frames(self, arguments: dict) -> list[int]:
        # Each frame is contiguous in both the raster and Qwen2.5-VL's window order.
        return [h * w for t, h, w in arguments["grid_thw"].tolist() for _ in range(t)]

    def select(self, scores: torch.Tensor, frames: list[int], halt_ratio: float):
        device = scores.device
        kept = [kept_count(n, halt_ratio, 0) for n in frames]
        segment = torch.repeat_interleave(torch.arange(len(frames), device=device),
                                          torch.tensor(frames, device=device))
        order = scores.argsort(descending=True, stable=True)
        order = order[segment[order].argsort(stable=True)]  # by frame, best first within a frame
        # The first kept[i] entries of frame i's run in ``order``: built on the host, no sync.
        frames_t, kept_t = torch.tensor(frames, device="cpu"), torch.tensor(kept, device="cpu")
        shift = torch.repeat_interleave((frames_t.cumsum(0) - frames_t) - (kept_t.cumsum(0) - kept_t), kept_t)
        slots = (torch.arange(sum(kept), device="cpu") + shift).to(device)
        return order[slots].sort().values, frames, kept

    def random(self, hidden: torch.Tensor, seed: int) -> torch.Tensor:
        return random_scores(1, hidden.shape[0], seed, hidden.device)[0]

    def run_active(self, forward, hidden: torch.Tensor, args, kwargs, call: _Call) -> torch.Tensor:
        """Run a block on the active tokens with compacted segments and rotary tables."""
        if "cu_seqlens" not in kwargs:
            raise ValueError("halted_vision expects the tower to pass cu_seqlens to its blocks by keyword")
        index = call.index.to(hidden.device)
        kwargs = dict(kwargs)
        cu_seqlens, max_seqlen = call.once(kwargs["cu_seqlens"], lambda cu: _compact_segments(cu, index))
        kwargs["cu_seqlens"] = cu_seqlens
        if kwargs.get("max_seqlen") is not None:  # flash attention only
            kwargs["max_seqlen"] = max_seqlen
        if kwargs.get("position_embeddings") is not None:
            kwargs["position_embeddings"] = call.once(
                kwargs["position_embeddings"], lambda rotary: tuple(t[index] for t in rotary))
        active = forward(hidden[index], *args, **kwargs)
        return hidden.index_copy(0, index, active)


def _compact_segments(cu_seqlens: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Segment boundaries of the active tokens: a boundary b becomes #active tokens before b.
    Segments left empty (windows that halted whole) are dropped. -> (cu_seqlens, max length)."""
    compact = torch.searchsorted(index, cu_seqlens.to(index.dtype)).to(cu_seqlens.dtype)
    compact = torch.unique_consecutive(compact)
    return compact, int((compact[1:] - compact[:-1]).max())


@functools.cache
def _families() -> dict[type, object]:
    from transformers import CLIPVisionModel, SiglipVisionModel
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    return {
        CLIPVisionModel: _Batched("clip", class_token=True),
        SiglipVisionModel: _Batched("siglip", class_token=False),
        Qwen2VisionTransformerPretrainedModel: _Packed("qwen2_vl"),
        Qwen2_5_VisionTransformerPretrainedModel: _Packed("qwen2_5_vl"),
    }


def find_vision_tower(model: nn.Module):
    """The supported vision tower of ``model`` (a VLM, its inner model, or the tower itself),
    found at ``model[.model].vision_tower`` or ``model[.model].visual``; and its family."""
    inner = getattr(model, "model", None)
    candidates = [model, getattr(model, "vision_tower", None), getattr(model, "visual", None),
                  getattr(inner, "vision_tower", None), getattr(inner, "visual", None)]
    for tower in candidates:
        for tower_class, family in _families().items():
            if isinstance(tower, tower_class):
                return tower, family
    raise ValueError(
        f"halted_vision supports the vision towers {', '.join(SUPPORTED)}; "
        f"found none in {type(model).__name__}")


_HALTING: weakref.WeakSet = weakref.WeakSet()  # towers inside a halted_vision context


class _Halting:
    """The wrappers that replace the tower's and its layers' ``forward`` during the context."""

    def __init__(self, family, config: DashConfig, record: VisionHalting):
        self.family, self.config, self.record = family, config, record
        self.call: _Call | None = None

    def tower_forward(self, original):
        signature = inspect.signature(original)

        def forward(*args, **kwargs):
            previous = self.call
            self.call = _Call(self.family.frames(signature.bind(*args, **kwargs).arguments))
            try:
                return original(*args, **kwargs)
            finally:
                self.call = previous

        return forward

    def start_forward(self, layer: nn.Module, original):
        def forward(hidden, *args, **kwargs):
            call = self.call
            if call is None:
                return original(hidden, *args, **kwargs)
            updates = []
            hook = getattr(layer, self.family.attention).register_forward_hook(
                lambda module, inputs, output: updates.append(output[0] if isinstance(output, tuple) else output))
            try:
                output = original(hidden, *args, **kwargs)
            finally:
                hook.remove()
            self._decide(call, hidden, updates[0])
            return output

        return forward

    def later_forward(self, original):
        def forward(hidden, *args, **kwargs):
            call = self.call
            if call is None or call.index is None:
                return original(hidden, *args, **kwargs)
            return self.family.run_active(original, hidden, args, kwargs, call)

        return forward

    def _decide(self, call: _Call, hidden: torch.Tensor, update: torch.Tensor) -> None:
        """The halting decision: score every token, keep the best of each image."""
        config = self.config
        if config.policy == "random":
            scores = self.family.random(hidden, config.seed)
        else:
            scores = delta_norm(update, hidden if config.score == "relative" else None)
        index, tokens, kept = self.family.select(scores, call.frames, config.halt_ratio)
        self.record.selections.append(VisionSelection(index, scores, tokens, kept))
        if kept != tokens:
            call.index = index
        logger.debug("%s: halting at layer %d keeps %s of %s tokens per image",
                     self.family.name, self.record.start_layer, kept, tokens)


@contextmanager
def halted_vision(model: nn.Module, config: DashConfig | None):
    """Run the VLM's own vision encoder with Delta Attention Selective Halting.

    Inside the context, every forward of the vision tower (``get_image_features``, the VLM's
    forward, ``generate``) halts patch tokens as ``config`` says; the code around the encoder
    runs unchanged. On exit, even on an error, the tower and its layers are restored.

    Parameters
    ----------
    model : a Llava, Gemma 3, Qwen2-VL or Qwen2.5-VL model (``*ForConditionalGeneration``,
        its ``.model``, or the vision tower itself).
    config : DashConfig or None
        ``halt_ratio`` (ρ per image), ``start_layer`` (index, or fraction of encoder depth),
        ``policy`` ("dash" or "random"), ``score``, ``seed``. None, policy "none" or ρ = 0
        leave the encoder untouched.

    Yields
    ------
    VisionHalting with one :class:`VisionSelection` per tower forward, or None when untouched.
    """
    tower, family = find_vision_tower(model)
    if config is None or not config.scores_tokens or config.halt_ratio == 0:
        yield None
        return
    if config.policy == "attention":
        raise ValueError("policy 'attention' is not defined inside a vision encoder; use 'dash' or 'random'")
    if tower in _HALTING:
        raise RuntimeError("this vision tower is already inside a halted_vision context")
    layers = family.layers(tower)
    start = config.resolve_start_layer(len(layers))
    record = VisionHalting(family.name, start, len(layers))
    halting = _Halting(family, config, record)
    patched: list[tuple[nn.Module, object]] = []

    def patch(module: nn.Module, wrap) -> None:
        patched.append((module, module.__dict__.get("forward")))
        module.forward = wrap(module.forward)

    _HALTING.add(tower)
    try:
        patch(tower, halting.tower_forward)
        patch(layers[start], functools.partial(halting.start_forward, layers[start]))
        for layer in layers[start + 1:]:
            patch(layer, halting.later_forward)
        yield record
    finally:
        for module, previous in reversed(patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        _HALTING.discard(tower)

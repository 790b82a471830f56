"""Hugging Face's own ``model.generate`` with the prompt prefilled by DASH.

``with halting(model, config): model.generate(**inputs)`` keeps HF's generation loop (sampling,
logits processors, stopping criteria, streamers, ``return_dict_in_generate``) and replaces, for
the duration of the block, the model's forward by the library's two calls:

* the prefill (a call on an empty cache): :func:`prefill.prefill`; its cache goes back to HF as a
  :class:`DashCache`, which carries the prefill's state (key layouts, next positions);
* every later call (the new token of each row): :func:`decode.extend` on that state, so generated
  tokens continue at position T on every layer, masked to fit each layer's cache.

Positions and masks come from the state (``cache.KeyLayout``): HF's ``position_ids`` and growing
``attention_mask`` are not read after the prefill. What cannot work raises a one-line ValueError
before any model work (beam search, assisted generation, static/offloaded/quantized caches,
chunked prefill, a prompt already holding past_key_values, inputs_embeds, attentions).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import torch
from transformers import DynamicCache
from transformers.generation import GenerationMode
from transformers.modeling_outputs import CausalLMOutputWithPast

from dash_prefill.hf.adapters import adapter_for
from dash_prefill.core.config import DashConfig
from dash_prefill.hf.decode import extend
from dash_prefill.hf.multimodal import MULTIMODAL_INPUTS
from dash_prefill.hf.prefill import PrefillResult, prefill

logger = logging.getLogger(__name__)

WHERE = "under dash_prefill.halting"
# What generate passes that the DASH state makes redundant (positions, masks) or that asks nothing
# (cache_position: what earlier 5.x releases passed).
# The output's cache field: ``cache`` since transformers' rename, ``past_key_values`` before (5.17).
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
BOOKKEEPING = ("attention_mask", "position_ids", "cache_position", "use_cache", "return_dict", "logits_to_keep",
               "output_attentions", "output_hidden_states")
_ABSENT = object()


class DashCache(DynamicCache):
    """The cache of a DASH prefill as HF's generate sees it: the prefill's layers, plus the state
    decoding continues from.

    state : PrefillResult
        ``key_layouts`` (original positions of every layer's keys), ``next_positions``,
        ``stats``; ``state.cache`` is this object. Layers from the start layer on hold only the
        active tokens, (batch, kv_heads, kept + new, head_dim).
    seen : int
        Sequence length fed so far (prompt width + generated tokens); ``get_seq_length`` returns
        it on every layer, as HF's own caches do.
    """

    def __init__(self, state: PrefillResult, seen: int):
        super().__init__()
        self.layers, self.state, self.seen = state.cache.layers, state, seen
        state.cache = self

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        # Only HF's own forward asks this; a DASH cache's masks come from its key layouts.
        raise ValueError("a DASH cache can only be decoded inside dash_prefill.halting(model): its layers "
                         "hold different numbers of keys; generate again inside the block")


@contextlib.contextmanager
def halting(model, config: DashConfig | None = None, *, vision_config: DashConfig | None = None):
    """Run HF ``model.generate`` (and direct forward calls) with the prompt prefilled by DASH.

    Parameters
    ----------
    model : a supported ``*ForCausalLM`` or vision-language ``*ForConditionalGeneration``.
    config : DashConfig, default: the model's recommended setting for each prompt's length
        (``recommended_config``, resolved at each prefill).
    vision_config : DashConfig, optional; VLMs: halting inside the vision encoder as well.

    Inside the block, ``model(input_ids, attention_mask=..., **processor_outputs)`` on no cache
    (or an empty DynamicCache) prefills with DASH and returns logits (batch, 1, vocab) of the
    last prompt position and a :class:`DashCache`; ``model(new_ids, cache=that_cache)`` with
    new_ids (batch, k) returns logits (batch, k, vocab). Greedy ``model.generate`` then gives the
    tokens of :func:`dash_prefill.generate`. On exit (also on an exception) ``model.forward`` and
    ``model.generate`` are what they were before.
    """
    adapter_for(model)  # an unsupported family fails here, naming the supported ones
    for name, value in (("config", config), ("vision_config", vision_config)):
        if value is not None and not isinstance(value, DashConfig):
            raise ValueError(f"{name} must be a DashConfig, e.g. DashConfig(halt_ratio=0.5); got {type(value).__name__}")
    if getattr(model.forward, "dash_halting", False):
        raise ValueError("the model is already inside dash_prefill.halting; leave that block before entering another")
    saved = {name: vars(model).get(name, _ABSENT) for name in ("forward", "generate")}
    model.forward = _halted_forward(model, model.forward, config, vision_config)
    model.generate = _checked_generate(model, model.generate)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is _ABSENT:
                vars(model).pop(name, None)  # the class's method shows through again
            else:
                setattr(model, name, value)


def _halted_forward(model, forward, config: DashConfig | None, vision_config: DashConfig | None):
    @functools.wraps(forward)  # generate inspects the signature (attention_mask, logits_to_keep)
    def halted(input_ids: torch.Tensor | None = None, **inputs):
        cache = inputs.pop("cache", None)
        if cache is None:
            cache = inputs.pop("past_key_values", None)  # the name before transformers 5.x's rename
        multimodal = _model_inputs(input_ids, inputs)
        if isinstance(cache, DashCache):
            if "pixel_values" in multimodal or "pixel_values_videos" in multimodal:
                raise ValueError(f"images after the prefill are not supported {WHERE}: put every image in the prompt")
            logits = extend(model, cache.state, input_ids)  # (batch, k, vocab)
            cache.seen += input_ids.shape[1]
        else:
            _check_empty(cache)
            keep = inputs.get("logits_to_keep")
            if keep is not None and not (isinstance(keep, int) and keep == 1):
                raise ValueError(f"logits_to_keep={keep!r} is not supported {WHERE}: the DASH prefill computes "
                                 "the last prompt position's logits only; pass logits_to_keep=1")
            state = prefill(model, input_ids, config, inputs.get("attention_mask"),
                            vision_config=vision_config, **multimodal)
            cache = DashCache(state, input_ids.shape[1])
            logits = state.logits[:, None]  # (batch, 1, vocab)
            logger.debug("DASH prefill kept %s of %s tokens per row", state.stats.kept_tokens,
                         state.stats.prompt_tokens)
        output = CausalLMOutputWithPast(logits=logits, **{_CACHE_FIELD: cache})
        return output if inputs.get("return_dict", True) is not False else output.to_tuple()

    # generate pre-encodes images for a forward that takes mm_encoder_outputs; DASH's prefill
    # encodes them itself (halting in the encoder with vision_config), so pixel_values come here.
    signature = inspect.signature(forward)
    halted.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.name != "mm_encoder_outputs"])
    halted.dash_halting = True
    return halted


def _model_inputs(input_ids, inputs: dict) -> dict:
    """ValueError for what the DASH forward cannot do; returns the VLM processor's inputs."""
    if input_ids is None:
        raise ValueError(f"inputs_embeds is not supported {WHERE}: DASH embeds the prompt itself; pass input_ids")
    if inputs.get("use_cache") is False:
        raise ValueError(f"use_cache=False is not supported {WHERE}: decoding continues from the DASH cache; "
                         "leave use_cache on")
    for name in ("output_attentions", "output_hidden_states"):
        if inputs.get(name):
            raise ValueError(f"{name}=True is not supported {WHERE}: the DASH prefill returns neither; leave it off")
    unknown = sorted(k for k, v in inputs.items()
                     if v is not None and k not in BOOKKEEPING and k not in MULTIMODAL_INPUTS)
    if unknown:
        raise ValueError(f"{', '.join(unknown)} is not supported {WHERE}: the model takes input_ids, "
                         "attention_mask and a VLM processor's outputs")
    return {k: v for k, v in inputs.items() if k in MULTIMODAL_INPUTS and v is not None}


def _check_empty(cache) -> None:
    """The prefill starts from no cache or an empty plain DynamicCache (what generate makes)."""
    if cache is None:
        return
    if type(cache) is not DynamicCache or cache.offloading:
        kind = "an offloaded DynamicCache" if getattr(cache, "offloading", False) else type(cache).__name__
        raise ValueError(f"{kind} is not supported {WHERE}: DASH layers hold different numbers of keys; "
                         "use the default dynamic cache (leave cache_implementation unset)")
    if cache.get_seq_length() > 0:
        raise ValueError(f"a prompt already holding past_key_values ({cache.get_seq_length()} tokens) is not "
                         f"supported {WHERE}: pass the whole prompt without past_key_values")


def _checked_generate(model, generate):
    signature = inspect.signature(generate)

    @functools.wraps(generate)
    def checked(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        # The same resolution generate makes first (a private helper of transformers 5.x): the
        # model's defaults, then the caller's options.
        generation_config, model_kwargs = model._prepare_generation_config(
            arguments.get("generation_config"), **arguments.get("kwargs", {}))
        _check_generation(generation_config, model_kwargs, arguments.get("assistant_model"))
        return generate(*args, **kwargs)

    checked.dash_halting = True
    return checked


def _check_generation(generation_config, model_kwargs: dict, assistant_model) -> None:
    """ValueError, before any model work, for generation options DASH cannot serve."""
    mode = generation_config.get_generation_mode(assistant_model)
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise ValueError(f"{mode.value.replace('_', ' ')} is not supported {WHERE}: use greedy decoding or "
                         "sampling (num_beams=1, no assistant_model or prompt_lookup_num_tokens)")
    if generation_config.cache_implementation not in (None, "dynamic"):
        raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} is not supported "
                         f"{WHERE}: DASH layers hold different numbers of keys; leave it unset (the dynamic cache)")
    if generation_config.prefill_chunk_size is not None:
        raise ValueError(f"prefill_chunk_size is not supported {WHERE}: DASH prefills the whole prompt at once; "
                         "leave it unset")
    if model_kwargs.get("cache") is not None or model_kwargs.get("past_key_values") is not None:
        raise ValueError(f"a prompt already holding past_key_values is not supported {WHERE}: pass the whole "
                         "prompt without past_key_values (the DASH prefill builds the cache)")
    if model_kwargs.get("position_ids") is not None:
        raise ValueError(f"position_ids are not supported {WHERE}: positions follow attention_mask (left "
                         "padding), as in plain generate; leave position_ids out")

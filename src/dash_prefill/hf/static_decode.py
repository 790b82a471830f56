"""Static-shape decoding after a DASH prefill: preallocated caches, one step replayed per token.

The dynamic path (``decode.py``) grows every layer's cache by concatenation, so each token
allocates and launches anew. Here every layer's keys and values are allocated once, for the
entries the prefill left plus the new tokens; a step writes its token at slot
``cached + count`` (``count`` a device counter), and its mask is rebuilt on the device from
each slot's original position and whether it holds a key yet. No step reads a host value, so
on a GPU the step is captured once as a CUDA graph and replayed; on a CPU (or with a rotary
table that reads positions on the host, dynamic / long RoPE) the same step runs eagerly.

The replayed graph of the eager step still launches some 45 small kernels a layer, which at
batch 1 cost more than reading the weights. ``compiled``: the step is compiled by
``torch.compile`` (norms, rotary products, activations and masks fused into a few kernels a
layer) in its reduce-overhead mode, which records and replays it as CUDA graphs; compiling
costs time once per model, process and layout structure (dynamic shapes); see BENCHMARKS.md.
Its graphs are recorded for the buffers' addresses, and a call whose buffers lie elsewhere
records them anew (about 25 ms at 8K in the Llama-3.1-8B shape on an H200), so a compiled
decoder keeps its buffers on the model for the next call whose buffers have the same shapes
(as HF's static cache does; not where the step runs eagerly); :func:`release_buffers` frees them.
"""

from __future__ import annotations

import logging
import weakref

import torch

from dash_prefill.hf.adapters import adapter_for, device_of
from dash_prefill.hf.decode import grouped_attention
from dash_prefill.core.policy import host_to_device
from dash_prefill.hf.prefill import PrefillResult, layer_step

logger = logging.getLogger(__name__)


# Slots per layer are rounded up to a multiple of this: the attention products read the buffers
# with the slot count as a leading dimension, and cuBLAS takes its tensor-core kernels only for
# aligned ones (an odd count such as 32768 + 511 selects far slower kernels).
SLOT_ALIGN = 64


def slot_count(cached: int, new_tokens: int) -> int:
    """Slots of a layer holding ``cached`` keys that will take ``new_tokens`` more: aligned."""
    return -(-(cached + new_tokens) // SLOT_ALIGN) * SLOT_ALIGN


class StaticDecoder:
    """Decode up to ``new_tokens`` tokens per row from ``state`` into preallocated buffers.

    keys, values : per layer (batch, kv_heads, slots, head_dim), slots = :func:`slot_count`
    positions, written : per group of layers sharing a ``KeyLayout``, (batch, slots):
        each slot's original position, and whether it holds a real key (prompt padding and
        filler slots never do; slot ``cached + i`` does once token i is written).
    The decoder takes over ``state``: its dynamic cache is not advanced. ``keep``: reuse the
    buffers the model's last kept decoder left where their shapes fit, and keep these.
    """

    def __init__(self, model, state: PrefillResult, new_tokens: int, keep: bool = False):
        self.adapter = adapter = adapter_for(model)
        devices = {device_of(layer) for layer in adapter.layers} | {adapter.device, device_of(model.lm_head)}
        if len(devices) > 1:
            raise ValueError("static_decode needs every layer on one device; got "
                             f"{sorted(map(str, devices))}: use static_decode=False")
        if adapter.config._attn_implementation == "flash_attention_2":
            raise ValueError("static_decode masks the preallocated slots, which flash_attention_2 cannot; "
                             "load the model with attn_implementation='sdpa' or use static_decode=False")
        device = adapter.device
        # keep: written into the buffers the model's last compiled decoder left where they fit
        # (same addresses: its recorded graphs replay), and left on the model for the next call.
        kept = _kept_for(model, self) if keep else None
        grow = lambda tensor, dim=2: self._grown(tensor, new_tokens, dim, next(kept, None) if kept else None)  # noqa: E731
        self.keys = [grow(layer.keys) for layer in state.cache.layers]
        self.values = [grow(layer.values) for layer in state.cache.layers]
        layouts = list({id(layout): layout for layout in state.key_layouts}.values())  # one per group
        group = {id(layout): index for index, layout in enumerate(layouts)}
        self.group_of = [group[id(layout)] for layout in state.key_layouts]
        self.positions = [grow(layout.positions, 1) for layout in layouts]
        self.written = [grow(torch.ones_like(layout.positions, dtype=torch.bool) if layout.real is None
                             else layout.real, 1) for layout in layouts]
        group_first = [layout.num_keys for layout in layouts]
        # Entries each layer's prefill left, as device scalars: no value a compiled step would
        # specialise on (and recompile for) changes from one prompt to the next.
        self.first = [grow(t, None) for t in host_to_device([layer.keys.shape[2] for layer in state.cache.layers], device)]
        self.group_first = [grow(t, None) for t in host_to_device(group_first, device)]
        self.next_positions = grow(state.next_positions.to(device), None)  # (batch,)
        self.count = grow(torch.zeros((), dtype=torch.long, device=device), None)  # tokens written so far
        self.rope_offset = None if state.rope_offset is None else grow(state.rope_offset.to(device), None)
        if keep:
            _keep(model, self)

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor the step reads or writes in place, in one order."""
        rest = [self.next_positions, self.count] + ([] if self.rope_offset is None else [self.rope_offset])
        return [*self.keys, *self.values, *self.positions, *self.written, *self.first, *self.group_first, *rest]

    @staticmethod
    def _grown(tensor: torch.Tensor, new_tokens: int, dim: int | None = 2,
               into: torch.Tensor | None = None) -> torch.Tensor:
        """``tensor`` followed by zeros along ``dim`` up to :func:`slot_count` slots (``dim=None``:
        a copy of ``tensor``), written into ``into`` when it has the result's shape and dtype."""
        shape = list(tensor.shape)
        if dim is not None:
            shape[dim] = slot_count(shape[dim], new_tokens)
        if into is None or list(into.shape) != shape or into.dtype != tensor.dtype or into.device != tensor.device:
            into = tensor.new_empty(shape)
        if dim is None:
            return into.copy_(tensor)
        into.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
        into.narrow(dim, tensor.shape[dim], shape[dim] - tensor.shape[dim]).zero_()
        return into

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """What an attention module calls on its cache: write this token's (batch, kv_heads, 1,
        head_dim) key and value into its slot; return the whole buffers."""
        slot = (self.first[layer_idx] + self.count).view(1)
        self.keys[layer_idx].index_copy_(2, slot, key_states)
        self.values[layer_idx].index_copy_(2, slot, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, run=None) -> torch.Tensor:
        """One token per row (batch, 1) at the next original positions; logits (batch, vocab).
        ``run``: what runs the step's layers (:func:`compiled_layers`), else they run here."""
        with grouped_attention(self.adapter.config):
            return (run or StaticDecoder.layers)(self, token_ids)

    def layers(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The step itself, under :func:`grouped_attention`: (batch, 1) -> (batch, vocab)."""
        adapter = self.adapter
        hidden = adapter.embed(token_ids)  # (batch, 1, hidden)
        positions = (self.next_positions + self.count)[:, None]  # (batch, 1)
        rope = positions if self.rope_offset is None else positions + self.rope_offset[..., None]
        for group, first in enumerate(self.group_first):
            slot = (first + self.count).view(1)
            self.positions[group].index_copy_(1, slot, positions)
            self.written[group].index_fill_(1, slot, True)
        rotary, masks = {}, {}  # per layer type, per (group, window)
        eager = adapter.config._attn_implementation == "eager"
        for idx, layer in enumerate(adapter.layers):
            layer_type, key = adapter.layer_types[idx], (self.group_of[idx], adapter.windows[idx])
            if layer_type not in rotary:
                rotary[layer_type] = adapter.rotary(hidden, rope, idx)
            if key not in masks:
                masks[key] = self._mask(*key, positions, hidden.dtype, eager)
            hidden = layer_step(adapter, layer, hidden, rotary[layer_type], masks[key], self)
        self.count += 1
        return adapter.logits(hidden[:, -1])

    def _mask(self, group: int, window: int | None, query: torch.Tensor, dtype: torch.dtype,
              eager: bool) -> torch.Tensor:
        """(batch, 1, 1, slots): written keys at original positions <= the query's, inside the window."""
        key_pos, query_pos = self.positions[group][:, None, :], query[:, :, None]
        allowed = self.written[group][:, None, :] & (key_pos <= query_pos)
        if window is not None:
            allowed &= key_pos > query_pos - window
        allowed = allowed[:, None]
        if eager:
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return allowed


def graphable(adapter) -> bool:
    """Whether the step can be captured: on CUDA, with rotary tables that never read positions
    on the host (dynamic and long RoPE pick their frequencies from the largest position)."""
    rope_type = getattr(adapter.base.rotary_emb, "rope_type", "default")
    types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    return adapter.device.type == "cuda" and not any("dynamic" in t or t == "longrope" for t in types)


_COMPILED = None


def compiled_layers():
    """``StaticDecoder.layers`` compiled once per process by ``torch.compile`` in its
    "reduce-overhead" mode: the fused step is recorded and replayed as CUDA graphs by
    PyTorch itself (a new prompt shape records anew; dynamic shapes: one compilation serves
    every prompt length, a new model or layout structure compiles again)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(StaticDecoder.layers, dynamic=True, mode="reduce-overhead")
    return _COMPILED


def compiled_step(decoder: StaticDecoder):
    """The compiled step of ``decoder``: its buffers are marked as static addresses, so the
    CUDA graphs write the cache in place (as HF's StaticCache does)."""
    for tensor in decoder.buffers():
        torch._dynamo.mark_static_address(tensor)
    run = compiled_layers()
    return lambda token_ids: decoder.step(token_ids, run).clone()  # outputs of a replay are overwritten by the next


# Per model: the buffers of its last compiled decoder and a weak reference to that decoder.
_KEPT: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[list[torch.Tensor], weakref.ref]]" = weakref.WeakKeyDictionary()


def _kept_for(model, decoder: StaticDecoder):
    """An iterator over the buffers the model's last compiled decoder left, in
    :meth:`StaticDecoder.buffers` order, when that decoder is gone (none is shared with a
    decoder still in use); else None. ``_grown`` uses one where its shape fits."""
    buffers, owner = _KEPT.get(model, (None, None))
    if buffers is None or owner() is not None:
        return None
    return iter(buffers)


def _keep(model, decoder: StaticDecoder) -> None:
    _KEPT[model] = (decoder.buffers(), weakref.ref(decoder))


def release_buffers(model) -> None:
    """Free the decoding buffers a compiled decoder kept on ``model`` for its next call."""
    _KEPT.pop(model, None)


class GraphedStep:
    """``decoder.step`` captured as one CUDA graph; calling it replays the graph on ``token_ids``.

    The first call runs the step for real (on a side stream, the warm-up capture asks for), then
    captures it; every later call copies the tokens into the graph's input and replays.
    The logits returned are the graph's output buffer, overwritten by the next call.
    """

    def __init__(self, decoder: StaticDecoder):
        self.decoder, self.graph = decoder, None

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = self.decoder.step(token_ids)  # the real first step, also the warm-up
            torch.cuda.current_stream().wait_stream(stream)
            self.tokens, self.graph = token_ids.clone(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the step; runs nothing
                self.logits = self.decoder.step(self.tokens)
            return logits
        self.tokens.copy_(token_ids)
        self.graph.replay()
        return self.logits


def check_static_mode(mode) -> None:
    """One clear line for a ``static_decode`` value other than False, True and "compiled"."""
    if not (mode is False or mode is True or mode == "compiled"):
        raise ValueError(f"static_decode must be False, True (a CUDA graph of the step) or 'compiled' "
                         f"(torch.compile, then a CUDA graph); got {mode!r}")


def static_step(model, state: PrefillResult, new_tokens: int, mode: bool | str = True):
    """The step function of a static decoder for ``new_tokens`` tokens: graphed where it can be,
    compiled first with ``mode="compiled"``."""
    check_static_mode(mode)
    graphed = graphable(adapter_for(model))
    # Buffers are kept for the compiled graphs' next replay; run eagerly, nothing is kept.
    decoder = StaticDecoder(model, state, new_tokens, keep=mode == "compiled" and graphed)
    if graphed:
        return compiled_step(decoder) if mode == "compiled" else GraphedStep(decoder)
    logger.info("static decoding runs eagerly on %s (no CUDA graph, not compiled)", decoder.count.device)
    return decoder.step

"""Decoding after a DASH prefill: ordinary decoding over the cache the prefill produced.

Every layer sees every new token; each layer attends to what its cache holds (all prompt tokens
before the start layer, survivors from it on), masked by original positions (``cache.KeyLayout``).
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dash_prefill.hf.adapters import adapter_for, device_of
from dash_prefill.hf.cache import KeyLayout
from dash_prefill.hf.flash_decode import available as flash_decode_available, flash_decode
from dash_prefill.hf.prefill import LayerInputs, PrefillResult, layer_step

GROUPED_SDPA = "dash_prefill_grouped_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention of one query per row, for HF attention modules.

    The query heads that share a key head (GQA) become that head's queries, (batch, kv_heads,
    groups, head_dim), so keys and values are read once and never repeated (on a GPU by one
    flash-decoding kernel, :func:`_single_query_attention`). Measured on an H200 (Llama-3.1-8B shape, 32K keys, bf16),
    HF's sdpa on a single-query step dispatches to cuDNN's attention: 630 µs of GPU time a layer
    in the captured step (74% of it, scripts/probe_static_decode.py), and 1.7 ms of HOST time a
    call in eager decoding, 52 of its 78 ms a token (scripts/probe_eager_decode.py). Softmax in
    float32; the (batch, 1, 1, keys) boolean mask (or None: every key) broadcasts over heads.
    Anything else goes to HF's sdpa.
    """
    batch, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    boolean = attention_mask is None or attention_mask.dtype == torch.bool
    if queries != 1 or not boolean or kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    grouped = query.view(batch, kv_heads, heads // kv_heads, dim)
    scale = scaling if scaling is not None else dim ** -0.5
    # Compiled, the step calls it as an opaque operator: inductor keeps the kernel (its own
    # kernels for the products were slower over a long cache) and fuses what surrounds it.
    attend = single_query_attention if torch.compiler.is_compiling() else _single_query_attention
    output = attend(grouped, key, value, attention_mask, scale)
    return output.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def _single_query_attention(grouped: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for grouped queries (batch, kv_heads, groups, dim)
    against (batch, kv_heads, keys, dim): on a GPU with Triton the flash-decoding kernel
    (:mod:`dash_prefill.hf.flash_decode`; on an H200 0.59-0.67x the time of the cuBLAS products with
    a split-K second product at 8K-128K keys, BENCHMARKS.md), elsewhere :func:`products_attention`."""
    if key.is_cuda and flash_decode_available:
        return flash_decode(grouped, key, value, mask, scale)
    return products_attention(grouped, key, value, mask, scale)


def products_attention(grouped: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """:func:`_single_query_attention` as torch's two products (cuBLAS on a GPU), float32 softmax."""
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale  # (batch, kv_heads, groups, keys)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(value.dtype), value)  # (batch, kv_heads, groups, dim)


@torch.library.custom_op("dash_prefill::single_query_attention", mutates_args=())
def single_query_attention(grouped: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """:func:`_single_query_attention` as an operator torch.compile does not look into."""
    return _single_query_attention(grouped, key, value, mask, scale)


@single_query_attention.register_fake
def _(grouped, key, value, mask, scale):
    return value.new_empty(*grouped.shape[:-1], value.shape[-1])


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)


@contextlib.contextmanager
def grouped_attention(config, enabled: bool = True):
    """Attention modules of ``config`` call :func:`grouped_sdpa` inside (sdpa models only)."""
    if not enabled or config._attn_implementation != "sdpa":
        yield
        return
    config._attn_implementation = GROUPED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


@torch.no_grad()
def decode_step(model, state: PrefillResult, token_ids: torch.Tensor) -> torch.Tensor:
    """Run one token per row (batch, 1) at the next original positions; advance ``state``.

    Returns the logits (batch, vocab) of the new position.
    """
    return extend(model, state, token_ids)[:, -1]


@torch.no_grad()
def extend(model, state: PrefillResult, token_ids: torch.Tensor) -> torch.Tensor:
    """Run k given tokens per row (batch, k) after the prompt, causally among themselves, at
    the next original positions (teacher forcing); advance ``state``.

    Returns the logits (batch, k, vocab) after each of them.
    """
    adapter = adapter_for(model)
    hidden = adapter.embed(token_ids)  # (batch, k, hidden)
    steps = torch.arange(token_ids.shape[1], device=hidden.device)
    positions = state.next_positions[:, None].to(hidden.device) + steps  # (batch, k)
    rope = None if state.rope_offset is None else positions + state.rope_offset[..., None].to(hidden.device)
    grown: dict[int, tuple[KeyLayout, LayerInputs]] = {}  # layers sharing a layout share its masks
    layouts = []
    # On a GPU one token's attention is grouped_sdpa (the flash-decoding kernel; torch's two
    # products without Triton), not cuDNN's host-bound kernel;
    # on a CPU HF's sdpa stays (the evaluation's committed cells were decoded with it).
    with grouped_attention(adapter.config, enabled=hidden.device.type == "cuda"):
        for idx, layer in enumerate(adapter.layers):
            old = state.key_layouts[idx]
            if id(old) not in grown:
                new = old.append(positions.to(old.positions.device))
                grown[id(old)] = (new, LayerInputs(adapter, hidden.dtype, positions, new, rope))
            layout, inputs = grown[id(old)]
            hidden = hidden.to(device_of(layer))
            rotary, mask = inputs.get(idx, hidden.device)
            hidden = layer_step(adapter, layer, hidden, rotary, mask, state.cache)
            layouts.append(layout)
    state.key_layouts = layouts
    state.next_positions = state.next_positions + token_ids.shape[1]
    return adapter.logits(hidden)

"""Block-sparse prefill attention for Hugging Face attention modules (``DashConfig.density``).

In the layers before the first gate (every layer without one) the modules call
:func:`prefill_attention` (``prefill_attention_for``), which attends only the key blocks of
:mod:`dash_prefill.core.sparse`: torch's FlexAttention, compiled, on a GPU (it skips the blocks it
does not need), :func:`gathered_attention` elsewhere (each query block over the key blocks it
keeps, gathered: exact, so CPU evaluations score what the GPU computes; a 16K layer of Gemma-3-270M
on one CPU thread 1.8 s against dense SDPA's 7.1 s at density 0.1). Anything else (masks, sliding
windows that bite, queries after a cache, later layers) is HF's SDPA, which on an H100 with torch
2.11 already runs cuDNN's kernel (docs/decisions.md).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from dash_prefill.core.policy import host_to_device
from dash_prefill.core.sparse import BLOCK, block_estimate, grid, select_blocks

PREFILL = "dash_prefill"


@dataclass(frozen=True)
class SparsePrompt:
    """What the sparse layers of one prefill share: the density and, per row (batch,) long, the
    first real token (left padding before it)."""

    density: float
    start: torch.Tensor

    @classmethod
    def of(cls, density: float, lengths: list[int], seq_len: int, device: torch.device) -> SparsePrompt:
        return cls(density, host_to_device([seq_len - length for length in lengths], device))

    def to(self, device: torch.device) -> SparsePrompt:
        if self.start.device == device:
            return self
        return SparsePrompt(self.density, self.start.to(device))


def prefill_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, dash_sparse: SparsePrompt | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: query (batch, heads, q, dim), key and value
    (batch, kv_heads, seq, dim). Returns (batch, q, heads, dim), None."""
    seq_len = key.shape[2]
    whole = query.shape[2] == seq_len and (sliding_window is None or sliding_window >= seq_len)
    if dash_sparse is None or not whole:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, sliding_window=sliding_window, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    output = sparse_attention(query, key, value, dash_sparse.to(query.device), scaling)
    return output.transpose(1, 2).contiguous(), None


def sparse_attention(query, key, value, sparse: SparsePrompt, scaling: float) -> torch.Tensor:
    """Causal attention of a whole prompt over the key blocks :func:`select_blocks` keeps.
    query (batch, heads, seq, dim), key and value (batch, kv_heads, seq, dim) -> like query."""
    seq_len = key.shape[2]
    real = torch.arange(seq_len, device=query.device)[None, :] >= sparse.start[:, None]  # (batch, seq)
    estimate = block_estimate(query[:, :, -min(BLOCK, seq_len):], key, scaling, real)
    pad, _ = grid(seq_len)
    keep = select_blocks(estimate, (sparse.start + pad) // BLOCK, sparse.density)
    kernel = flex_attention if query.device.type == "cuda" else gathered_attention
    return kernel(query, key, value, keep, sparse.start, scaling)


def gathered_attention(query, key, value, keep, start, scaling) -> torch.Tensor:
    """Attention under the kept blocks, one query block at a time over the key blocks it keeps
    (gathered): work in proportion to the kept pairs, for the CPU. Returns (batch, heads, seq, dim)."""
    batch, heads, seq_len, _ = query.shape
    groups = heads // key.shape[1]
    pad, blocks = grid(seq_len)
    q, k, v = (torch.nn.functional.pad(t, (0, 0, pad, 0)).unflatten(2, (blocks, BLOCK)) for t in (query, key, value))
    slots = torch.arange(blocks * BLOCK, device=query.device).view(blocks, BLOCK)
    begin = (start + pad).tolist()  # first real slot of each row
    kept = keep.cpu()
    out = torch.empty_like(q)
    for b in range(batch):
        for h in range(heads):
            for block in range(blocks):
                chosen = kept[b, h, block].nonzero()[:, 0].to(query.device)
                key_slots = slots[chosen].flatten()  # (keys,)
                query_slots = slots[block][:, None]  # (BLOCK, 1)
                allowed = ((key_slots <= query_slots) & (key_slots >= begin[b])) | (key_slots == query_slots)
                scores = (q[b, h, block] @ k[b, h // groups, chosen].flatten(0, 1).T).float() * scaling
                probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).to(v.dtype)
                out[b, h, block] = probs @ v[b, h // groups, chosen].flatten(0, 1)
    return out.flatten(2, 3)[:, :, pad:]


FLEX_VARIANTS = 64  # compiled FlexAttention entries a process may hold: a model needs two (its first
# prompt length static, then symbolic lengths), each further model, dtype or scaling about one more


def _run_compiled_flex(*args, **kwargs) -> torch.Tensor:
    """The compiled FlexAttention, allowed ``FLEX_VARIANTS`` compiled entries: past dynamo's own
    limit (8) it would silently fall back to the unfused path, which syncs and holds the whole
    score matrix (tens of GB at 32K); past ours it says so."""
    limit = max(torch._dynamo.config.recompile_limit, FLEX_VARIANTS)
    try:
        with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
            return _compiled_flex()(*args, **kwargs)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        raise RuntimeError(f"block-sparse attention compiled FlexAttention for {limit} variants (models, dtypes, "
                           "scalings) in this process: call torch._dynamo.reset() between models, or run fewer "
                           "models per process") from None


@functools.cache
def _compiled_flex():
    """FlexAttention compiled once per process. ``dynamic=None``: the first prompt length is
    compiled static, a second one recompiles with symbolic lengths, and every later length reuses
    that (``dynamic=False`` recompiled per 128-token grid, hit dynamo's recompile limit after 8
    lengths and fell back to the unfused path, which materialises the whole score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    return torch.compile(flex, dynamic=None)


def flex_attention(query, key, value, keep, start, scaling, compiled: bool = True) -> torch.Tensor:
    """Attention under the kept blocks with FlexAttention: a block that is not kept is never
    read. Blocks strictly below the diagonal after a row's first real block are full (no mask
    inside); the diagonal and the first real block apply the causal and padding mask.
    Returns (batch, heads, seq, dim)."""
    from torch.nn.attention.flex_attention import BlockMask
    from torch.nn.attention.flex_attention import flex_attention as eager_flex

    seq_len = key.shape[2]
    pad, blocks = grid(seq_len)
    index = torch.arange(blocks, device=keep.device)
    begin = start + pad  # (batch,) first real token on the padded grid
    full = keep & (index[None, :] < index[:, None]) & (index > (begin // BLOCK)[:, None, None, None])
    partial = keep & ~full

    def mask_mod(b, h, q, k):  # the whole mask (torch's unfused path reads only this), run in partial blocks
        return (keep[b, h, q // BLOCK, k // BLOCK] & (k <= q) & (k >= begin[b])) | (q == k)

    def listed(blocks_kept):  # (batch, heads, q blocks) counts, (..., k blocks) indices kept first
        order = blocks_kept.to(torch.int8).argsort(dim=-1, descending=True, stable=True)
        return blocks_kept.sum(-1, dtype=torch.int32), order.to(torch.int32)

    extra = {"compute_q_blocks": False} if "compute_q_blocks" in _from_kv_blocks_parameters() else {}
    block_mask = BlockMask.from_kv_blocks(*listed(partial), *listed(full), BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                          seq_lengths=(seq_len + pad, seq_len + pad), **extra)
    padded = [torch.nn.functional.pad(t, (0, 0, pad, 0)) for t in (query, key, value)]
    run = _run_compiled_flex if compiled else eager_flex
    output = run(*padded, block_mask=block_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return output[:, :, pad:]


@functools.cache
def _from_kv_blocks_parameters() -> frozenset[str]:
    from torch.nn.attention.flex_attention import BlockMask
    return frozenset(inspect.signature(BlockMask.from_kv_blocks).parameters)


AttentionInterface.register(PREFILL, prefill_attention)


@contextlib.contextmanager
def prefill_attention_for(config, sparse: bool):
    """Attention modules of ``config`` call :func:`prefill_attention` inside when the prefill is
    block-sparse (sdpa models only); otherwise nothing changes."""
    previous = config._attn_implementation
    if not sparse:
        yield
        return
    if previous != "sdpa":
        raise ValueError(f"block-sparse attention (density or later_density < 1) needs attn_implementation='sdpa'; "
                         f"this model uses {previous!r}: load it with attn_implementation='sdpa'")
    config._attn_implementation = PREFILL
    try:
        yield
    finally:
        config._attn_implementation = previous

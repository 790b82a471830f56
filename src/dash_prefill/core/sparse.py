"""Block-sparse attention in the layers that keep every token: which key blocks each query
block attends (engine-free; the kernels are the engines').

Halting removes tokens from the layers after a gate; the layers before it still run causal
attention over the whole prompt, which is most of a 128K prefill's work. There each layer keeps,
per query head, a fraction ``density`` of the key blocks (FlexPrefill's query-aware pattern,
MInference's vertical lines):

- the estimate: the last query block's attention (the question) summed per key block, softmax
  over the whole prompt, per head (:func:`block_estimate`): one ranking of the key blocks per head;
- every query block attends the first block (attention sinks), the ``LOCAL_BLOCKS`` blocks
  before it and itself, and ``ceil(density x its other causal blocks)`` more, the ones the
  ranking puts highest among those it can see; the last query block (the question) attends
  every block (:func:`select_blocks`). (Ranking all blocks once and keeping the top
  ``ceil(density x blocks)`` for every query block spent most of the budget on the question's
  own neighbours, in the future of most query blocks: decisions.md.)

After a gate (``DashConfig.later_density``) the same holds over the tokens still computed, in their
order: the compacted rows are the sequence, a row's filler slots its padding.

Blocks are counted from the end of the prompt: with left padding (batches) a row's blocks hold
the same tokens as when it runs alone, so a row's output does not depend on its batch. The
grid is ``pad`` (< BLOCK) empty slots followed by the sequence.
"""

from __future__ import annotations

import functools
import math

import torch

BLOCK = 128  # tokens per query and key block (FlexAttention's default block size)
SINK_BLOCKS = 1  # the first block of a row is always attended (attention sinks, the template)
LOCAL_BLOCKS = 8  # and the 1024 tokens before a query block (its own block is always kept)
TAIL_BLOCKS = 1  # the last query block (the question) attends every block


def grid(seq_len: int) -> tuple[int, int]:
    """(pad, blocks): empty slots before the sequence so that blocks end where it ends."""
    pad = -seq_len % BLOCK
    return pad, (seq_len + pad) // BLOCK


def block_estimate(queries: torch.Tensor, keys: torch.Tensor, scaling: float,
                   key_real: torch.Tensor | None) -> torch.Tensor:
    """Attention of the last queries to every key, summed per key block and over the queries.

    queries : (batch, heads, window, dim), the last ``window`` positions (after rotary)
    keys : (batch, kv_heads, seq, dim); heads is a multiple of kv_heads (grouped queries)
    key_real : (batch, seq) bool, False at padding (or None)
    Returns (batch, heads, blocks) float32 on the grid of :func:`grid`.
    """
    batch, heads, window, dim = queries.shape
    kv_heads, seq_len = keys.shape[1], keys.shape[2]
    grouped = queries.reshape(batch, kv_heads, heads // kv_heads * window, dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scaling  # (batch, kv, g*w, seq)
    scores = scores.view(batch, kv_heads, heads // kv_heads, window, seq_len)
    query_index = torch.arange(seq_len - window, seq_len, device=keys.device)[:, None]
    hidden = torch.arange(seq_len, device=keys.device)[None, :] > query_index  # (window, seq) causal
    query_real = torch.ones(batch, window, dtype=torch.bool, device=keys.device)
    if key_real is not None:
        hidden = hidden | ~key_real[:, None, :]  # (batch, window, seq)
        query_real = key_real[:, -window:]
    hidden = hidden.expand(batch, window, seq_len)[:, None, None]
    probs = scores.masked_fill(hidden, float("-inf")).softmax(-1)
    # A padding query (a row shorter than the window) sees nothing real: it counts for nothing.
    probs = probs.nan_to_num(0.0) * query_real[:, None, None, :, None]
    per_token = probs.sum(3).reshape(batch, heads, seq_len)
    pad, blocks = grid(seq_len)
    return torch.nn.functional.pad(per_token, (pad, 0)).view(batch, heads, blocks, BLOCK).sum(-1)


def select_blocks(estimate: torch.Tensor, first_block: torch.Tensor, density: float) -> torch.Tensor:
    """The key blocks each query block attends.

    estimate : (batch, heads, blocks) from :func:`block_estimate`
    first_block : (batch,) long, the block of each row's first real token, ``(start + pad) // BLOCK``
    density : the share of a query block's other causal blocks (beyond the sink and its band) it
        keeps, the estimate's highest first (ties to the earlier block)
    Returns keep (batch, heads, query blocks, key blocks) bool: causal, no block before a row's
    first, a block always keeps itself. Computed on the device (no host sync).
    """
    batch, heads, blocks = estimate.shape
    index = torch.arange(blocks, device=estimate.device)
    query, key = index[:, None], index[None, :]
    real = index[None, :] >= first_block[:, None]  # (batch, blocks)
    causal = (key <= query) & real[:, None, :]  # (batch, query, key)
    sink = real & (index[None, :] < first_block[:, None] + SINK_BLOCKS)
    always = causal & ((query - key <= LOCAL_BLOCKS) | sink[:, None, :] | (query >= blocks - TAIL_BLOCKS))
    others = causal & ~always
    count = torch.ceil(others.sum(-1) * density)  # (batch, query)
    order = estimate.masked_fill(~real[:, None, :], -1.0).argsort(dim=-1, descending=True, stable=True)
    order = order[:, :, None, :].expand(batch, heads, blocks, blocks)  # (batch, heads, query, rank)
    in_order = others[:, None].expand(batch, heads, blocks, blocks).gather(-1, order)
    taken = in_order & (in_order.cumsum(-1) <= count[:, None, :, None])  # the first `count` it can see
    chosen = torch.zeros_like(taken).scatter_(-1, order, taken)
    return always[:, None] | chosen | (query == key)


@functools.cache  # the cost model asks once per layer, every layer between two gates the same
def sparse_fraction(seq_len: int, density: float) -> float:
    """The fraction of a prompt's causal (query, key) block pairs a layer keeps under
    :func:`select_blocks` (for the cost model; 1.0 at density 1)."""
    if density >= 1.0:
        return 1.0
    _, blocks = grid(seq_len)
    kept = 0
    for query in range(blocks):
        causal = query + 1
        if query >= blocks - TAIL_BLOCKS:
            kept += causal
            continue
        local = min(causal, LOCAL_BLOCKS + 1)
        always = local + min(SINK_BLOCKS, causal - local)  # the band, then the sink blocks before it
        kept += always + math.ceil(density * (causal - always))
    return kept / (blocks * (blocks + 1) / 2)

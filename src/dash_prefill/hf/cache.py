"""The KV cache of a DASH prefill: where survivors' keys sit, what each layer keeps, the masks.

Every cached key keeps the ORIGINAL position of its token (``KeyLayout``): this is where
survivors get their positions. Masks compare original positions, never compacted indices, so
causal order, sliding windows and padding stay exact after the sequence is compacted at the
start layer. Sliding-window layers are cropped to what a future token can still see, as Hugging
Face's own cache does, and the KV accounting (``cached_tokens``) counts what the cache holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class KeyLayout:
    """Original positions of the keys one group of layers holds, and which keys are real.

    positions : LongTensor (batch, keys)
    real : BoolTensor (batch, keys) or None
        False at keys that belong to no prompt token (left padding, filler slots of rows that
        keep fewer tokens than the widest row); None when every key is real.
    end : int
        One past the largest position of any row, known on the host (no device sync).
    blocks : LongTensor (batch, keys) or None
        Bidirectional blocks (Gemma-3 images): keys of one block (id >= 0) are visible to
        queries of the same block whatever their order; -1 = ordinary causal token.
    """

    positions: torch.Tensor
    real: torch.Tensor | None
    end: int
    blocks: torch.Tensor | None = None

    @property
    def num_keys(self) -> int:
        return self.positions.shape[1]

    def gather(self, index: torch.Tensor, filled: torch.Tensor | None) -> KeyLayout:
        """The layout of the keys at ``index`` (batch, kept); ``filled`` False at filler slots."""
        positions = self.positions.gather(1, index)
        old = None if self.real is None else self.real.gather(1, index)
        if old is None:
            real = filled
        else:
            real = old if filled is None else old & filled
        blocks = None if self.blocks is None else self.blocks.gather(1, index)
        return KeyLayout(positions, real, self.end, blocks)

    def tail(self, count: int) -> KeyLayout:
        """The layout of the last ``count`` keys."""
        real = None if self.real is None else self.real[:, -count:]
        blocks = None if self.blocks is None else self.blocks[:, -count:]
        return KeyLayout(self.positions[:, -count:], real, self.end, blocks)

    def append(self, positions: torch.Tensor) -> KeyLayout:
        """The layout after real keys at ``positions`` (batch, new) are appended (decoding,
        teacher-forced tokens)."""
        real = self.real
        if real is not None:
            real = torch.cat([real, real.new_ones(positions.shape)], dim=1)
        blocks = self.blocks  # appended (generated) tokens belong to no block
        if blocks is not None:
            blocks = torch.cat([blocks, blocks.new_full(positions.shape, -1)], dim=1)
        return KeyLayout(torch.cat([self.positions, positions], dim=1), real,
                         self.end + positions.shape[1], blocks)


# ----------------------------------------------------------------- what each layer keeps


def window_keeps(window: int | None) -> int | None:
    """Keys a sliding-window layer keeps after a forward: the ``window - 1`` a next token can
    still see (Hugging Face's own cache keeps as many); None (all) on full-attention layers."""
    return None if window is None else window - 1


def cached_tokens(num_tokens: int, window: int | None) -> int:
    """Entries per row a layer's cache holds after ``num_tokens`` keys went through it."""
    keep = window_keeps(window)
    return num_tokens if keep is None else min(num_tokens, keep)


def keep_cached(cache: DynamicCache, layer_idx: int, index: torch.Tensor) -> None:
    """Keep only the keys/values at ``index`` (batch, kept) in one layer (batch, heads, seq, dim)."""
    layer = cache.layers[layer_idx]
    slots = index[:, None, :, None]
    for name in ("keys", "values"):
        states = getattr(layer, name)
        setattr(layer, name, states.gather(2, slots.expand(-1, states.shape[1], -1, states.shape[3])))


def crop_to_window(cache: DynamicCache, layer_idx: int, layout: KeyLayout,
                   window: int | None) -> KeyLayout:
    """Crop a sliding-window layer to ``window_keeps(window)`` entries (copied, so the rest is
    freed); returns the layout of what it keeps.

    Positions grow along the cache, so the keys a future token can still see (original positions
    within the window) are among the last window-1 entries, compacted or not.
    """
    keep = window_keeps(window)
    if keep is None or layout.num_keys <= keep:
        return layout
    layer = cache.layers[layer_idx]
    layer.keys = layer.keys[:, :, -keep:].clone()
    layer.values = layer.values[:, :, -keep:].clone()
    return layout.tail(keep)


def kv_entries(cache: DynamicCache) -> list[int]:
    """Key/value entries each layer of ``cache`` holds, summed over the batch (host shapes)."""
    return [layer.keys.shape[0] * layer.keys.shape[2] for layer in cache.layers]


# ------------------------------------------------------------------------------- masks


def attention_mask(implementation: str, query_positions: torch.Tensor, keys: KeyLayout,
                   window: int | None, dtype: torch.dtype,
                   query_blocks: torch.Tensor | None = None) -> torch.Tensor | None:
    """The mask for queries at ``query_positions`` (batch, q), the last q entries of ``keys``.

    ``query_blocks`` (batch, q) with ``keys.blocks``: a query also sees every key of its own
    bidirectional block (Gemma-3 image tokens), inside the window as Hugging Face does.

    Returns None where plain causal attention is already exact (no padding, no window that can
    bite), so SDPA and FlashAttention keep their fused causal kernels. Otherwise a mask of shape
    (batch, 1, q, keys): bool (True = attend) for sdpa, additive float for eager.
    """
    window_bites = window is not None and keys.end > window
    blocks = query_blocks is not None and keys.blocks is not None
    # Fused causal kernels align the queries with the first keys: exact for one query or as
    # many queries as keys, not for several new tokens after a cache.
    aligned = query_positions.shape[1] in (1, keys.num_keys)
    if (keys.real is None and aligned and not window_bites and not blocks
            and implementation != "eager"):
        return None
    if implementation == "flash_attention_2":
        raise NotImplementedError(
            "flash_attention_2 supports DASH only without padding, without "
            "Gemma-3 image blocks and without sliding-window layers longer than the window; use "
            "attn_implementation='sdpa'"
        )
    key_pos = keys.positions[:, None, :]
    query_pos = query_positions[:, :, None]
    allowed = key_pos <= query_pos
    if blocks:
        same = keys.blocks[:, None, :] == query_blocks[:, :, None]
        allowed |= same & (query_blocks[:, :, None] >= 0)
    if window_bites:
        allowed &= key_pos > query_pos - window  # no (q, k) integer temporary
    if keys.real is not None:
        allowed &= keys.real[:, None, :]
        # Each query may always see itself, so padding and filler rows stay finite (never NaN).
        num_queries, num_keys = query_positions.shape[1], keys.num_keys
        key_index = torch.arange(num_keys, device=allowed.device)[None, :]
        own = torch.arange(num_keys - num_queries, num_keys, device=allowed.device)[:, None]
        allowed |= key_index == own  # broadcast, not an index_put: no host sync
    allowed = allowed[:, None]
    if implementation == "eager":
        blocked = torch.finfo(dtype).min
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, blocked)
    return allowed

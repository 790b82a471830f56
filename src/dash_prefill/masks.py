"""Where survivors get their positions: the key layout of a cache and the masks built from it.

Every cached key keeps the ORIGINAL position of its token. Masks compare original positions,
never compacted indices, so causal order, sliding windows and padding stay exact after the
sequence is compacted at the start layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class KeyLayout:
    """Original positions and validity of the keys one group of layers holds.

    positions : LongTensor (batch, keys)
    valid : BoolTensor (batch, keys) or None (every key real)
    span : int
        One past the largest position of any row, known on the host (no device sync).
    ordered : bool
        Whether positions grow along the keys (then causal order is index order).
    groups : LongTensor (batch, keys) or None
        Bidirectional blocks (Gemma-3 images): keys of one block (id >= 0) are visible to
        queries of the same block whatever their order; -1 = ordinary causal token.
    """

    positions: torch.Tensor
    valid: torch.Tensor | None
    span: int
    ordered: bool = True
    groups: torch.Tensor | None = None

    @property
    def num_keys(self) -> int:
        return self.positions.shape[1]

    def gather(self, index: torch.Tensor, valid: torch.Tensor | None) -> KeyLayout:
        """The layout of the keys at ``index`` (batch, kept), ``valid`` marking filler slots."""
        positions = self.positions.gather(1, index)
        old = None if self.valid is None else self.valid.gather(1, index)
        if old is None:
            merged = valid
        else:
            merged = old if valid is None else old & valid
        groups = None if self.groups is None else self.groups.gather(1, index)
        return KeyLayout(positions, merged, self.span, self.ordered, groups)

    def concat(self, other: KeyLayout) -> KeyLayout:
        """These keys followed by ``other``'s (positions no longer grow along the keys)."""
        if self.valid is None and other.valid is None:
            valid = None
        else:
            mine = self.valid if self.valid is not None else torch.ones_like(self.positions, dtype=torch.bool)
            theirs = other.valid if other.valid is not None else torch.ones_like(other.positions, dtype=torch.bool)
            valid = torch.cat([mine, theirs], dim=1)
        groups = None
        if self.groups is not None and other.groups is not None:
            groups = torch.cat([self.groups, other.groups], dim=1)
        return KeyLayout(torch.cat([self.positions, other.positions], dim=1), valid,
                         max(self.span, other.span), ordered=False, groups=groups)

    def tail(self, count: int) -> KeyLayout:
        """The layout of the last ``count`` keys."""
        valid = None if self.valid is None else self.valid[:, -count:]
        groups = None if self.groups is None else self.groups[:, -count:]
        return KeyLayout(self.positions[:, -count:], valid, self.span, self.ordered, groups)

    def append(self, positions: torch.Tensor, span: int) -> KeyLayout:
        """The layout after real keys at ``positions`` (batch, new) are appended."""
        valid = self.valid
        if valid is not None:
            valid = torch.cat([valid, valid.new_ones(positions.shape)], dim=1)
        groups = self.groups  # appended (generated) tokens belong to no block
        if groups is not None:
            groups = torch.cat([groups, groups.new_full(positions.shape, -1)], dim=1)
        return KeyLayout(torch.cat([self.positions, positions], dim=1), valid, span, self.ordered, groups)


def attention_mask(implementation: str, query_positions: torch.Tensor, keys: KeyLayout,
                   window: int | None, dtype: torch.dtype,
                   query_groups: torch.Tensor | None = None) -> torch.Tensor | None:
    """The mask for queries at ``query_positions`` (batch, q), the last q entries of ``keys``.

    ``query_groups`` (batch, q) with ``keys.groups``: a query also sees every key of its own
    bidirectional block (Gemma-3 image tokens), inside the window as Hugging Face does.

    Returns None where plain causal attention is already exact (no padding, no window that can
    bite), so SDPA and FlashAttention keep their fused causal kernels. Otherwise a mask of shape
    (batch, 1, q, keys): bool (True = attend) for sdpa, additive float for eager.
    """
    window_bites = window is not None and keys.span > window
    blocks = query_groups is not None and keys.groups is not None
    # Fused causal kernels align the queries with the first keys: exact for one query or as
    # many queries as keys, not for several new tokens after a cache.
    aligned = query_positions.shape[1] in (1, keys.num_keys)
    if (keys.valid is None and keys.ordered and aligned and not window_bites and not blocks
            and implementation != "eager"):
        return None
    if implementation == "flash_attention_2":
        raise NotImplementedError(
            "flash_attention_2 supports DASH only without padding, without frozen_keys, without "
            "Gemma-3 image blocks and without sliding-window layers longer than the window; use "
            "attn_implementation='sdpa'"
        )
    key_pos = keys.positions[:, None, :]
    query_pos = query_positions[:, :, None]
    allowed = key_pos <= query_pos
    if blocks:
        same = keys.groups[:, None, :] == query_groups[:, :, None]
        allowed |= same & (query_groups[:, :, None] >= 0)
    if window_bites:
        allowed &= key_pos > query_pos - window  # no (q, k) integer temporary
    if keys.valid is not None:
        allowed &= keys.valid[:, None, :]
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

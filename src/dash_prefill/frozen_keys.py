"""Opt-in strategy ``DashConfig(frozen_keys=True)``: halted tokens stay visible as keys/values.

method.md leaves open whether halted tokens should stay visible in later layers. Here their keys
and values are projected, in every layer after the start layer, from the hidden state frozen at
the start layer (h + U), and written to the cache ahead of the active tokens'; they still skip
queries, the attention output and the MLP. Measured no gain on SmolLM2-135M (EVAL.md,
docs/decisions.md), so it is off by default and lives outside the prefill loop: the loop only
sees a cache whose ``update`` writes the halted keys first.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .adapters import device_of
from .cache import KeyLayout
from .policy import Selection


class FrozenKeysCache(DynamicCache):
    """A DynamicCache that, the first time a layer after the start layer writes, writes the
    halted tokens' keys and values first (``pending[layer_idx]()`` computes them)."""

    def __init__(self, layers: list, pending: dict):
        super().__init__()
        self.layers, self.pending = layers, pending

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        write_halted = self.pending.pop(layer_idx, None)
        if write_halted is not None:
            super().update(*write_halted(), layer_idx, *args, **kwargs)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def halted_index(selection: Selection, seq_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens a selection halts, ascending per row: (batch, seq - fewest kept) indices and,
    when rows keep different counts, which of those slots are real (filler slots are halted)."""
    active = selection.index
    is_active = torch.zeros(active.shape[0], seq_len, dtype=torch.int8, device=active.device)
    marks = 1 if selection.filled is None else selection.filled.to(torch.int8)
    is_active.scatter_(1, active, marks)
    halted = is_active.argsort(dim=-1, stable=True)[:, :seq_len - min(selection.kept_per_row)]
    if max(selection.kept_per_row) == min(selection.kept_per_row):
        return halted, None
    return halted, is_active.gather(1, halted) == 0


def keep_halted_visible(state, hidden: torch.Tensor, selection: Selection, active: KeyLayout,
                        layer_idx: int) -> tuple[FrozenKeysCache, KeyLayout]:
    """At the start layer ``layer_idx``: keep its cache whole and make every later layer's cache
    begin with the halted tokens' keys. hidden : (batch, seq, hidden) = h + U of every token.
    Returns the cache and the layout of what later layers cache (halted, then active keys)."""
    from .prefill import LayerInputs

    adapter, home = state.adapter, state.layout.positions.device
    halted, filled = halted_index(selection, hidden.shape[1])
    frozen = hidden.gather(1, halted.to(hidden.device)[:, :, None].expand(-1, -1, hidden.shape[-1]))
    halted = halted.to(home)
    frozen_layout = state.layout.gather(halted, None if filled is None else filled.to(home))
    rope = None if state.rope is None else state.rope.gather(-1, halted.expand(*state.rope.shape[:-2], *halted.shape))
    inputs = LayerInputs(adapter, hidden.dtype, frozen_layout.positions, None, rope)

    def keys_values(idx: int):
        layer = adapter.layers[idx]
        device = device_of(layer)

        def write():
            rotary, _ = inputs.get(idx, device)
            return adapter.keys_values(layer, frozen.to(device), rotary)
        return write

    pending = {idx: keys_values(idx) for idx in range(layer_idx + 1, len(adapter.layers))}
    return FrozenKeysCache(state.cache.layers, pending), frozen_layout.concat(active)

"""Decoding after a DASH prefill: ordinary decoding over the cache the prefill produced.

Every layer sees every new token; each layer attends to what its cache holds (all prompt tokens
before the start layer, survivors from it on), masked by original positions (``cache.KeyLayout``).
"""

from __future__ import annotations

import torch

from .adapters import adapter_for, device_of
from .cache import KeyLayout
from .prefill import LayerInputs, PrefillResult, layer_step


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
    for idx, layer in enumerate(adapter.layers):
        old = state.key_layouts[idx]
        if id(old) not in grown:
            new = old.append(positions.to(old.positions.device))
            grown[id(old)] = (new, LayerInputs(adapter, hidden.dtype, positions, new, rope))
        layout, inputs = grown[id(old)]
        hidden = hidden.to(device_of(layer))
        rotary, mask = inputs.get(idx, hidden.device)
        hidden, _ = layer_step(adapter, layer, hidden, rotary, mask, state.cache)
        layouts.append(layout)
    state.key_layouts = layouts
    state.next_positions = state.next_positions + token_ids.shape[1]
    return adapter.logits(hidden)

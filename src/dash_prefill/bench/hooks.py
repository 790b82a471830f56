"""The comparison point: DASH as a kvpress-style press of forward hooks on the HF forward.

This re-implements the design of the authors' press, not this package's engine: the model's
own forward runs unchanged, a hook on the start layer's attention module (its output after
o_proj, before any post-attention norm: what the engine scores) picks the active
tokens, and every later decoder layer is wrapped by a pre-hook that clones the full hidden
state and gathers the survivors, and a post-hook that scatters the layer's output back into
the full sequence. Each layer recomputes its indices from the stored boolean active mask,
which costs one host synchronisation per layer. Survivors keep their original positions
(rotary tables, position ids and masks are gathered too), so results equal the engine's.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from dash_prefill.hf.adapters import output_cache
from dash_prefill.core.policy import delta_norm, select_active


def _gather_seq(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Entries of ``tensor`` (batch or 1, ...) at ``index`` (batch, kept) along dimension ``dim``."""
    tensor = tensor.expand(index.shape[0], *tensor.shape[1:])
    shape, target = [1] * tensor.dim(), list(tensor.shape)
    shape[0], shape[dim] = index.shape
    target[dim] = index.shape[1]
    return tensor.gather(dim, index.view(shape).expand(target))


class HookPress:
    """Forward hooks that halt tokens from ``start_layer`` on, the way the authors' press does.

    Parameters
    ----------
    model : a ``*ForCausalLM`` whose decoder layers live in ``model.model.layers``.
    halt_ratio, start_layer, protect_first, protect_last :
        As in :class:`dash_prefill.DashConfig`; ``start_layer`` is a layer index.
    """

    def __init__(self, model: nn.Module, halt_ratio: float, start_layer: int,
                 protect_first: int = 4, protect_last: int = 64):
        self.model, self.halt_ratio, self.start_layer = model, halt_ratio, start_layer
        self.protect_first, self.protect_last = protect_first, protect_last
        self.active: torch.Tensor | None = None  # (batch, seq) bool
        self._full: torch.Tensor | None = None  # (batch, seq, hidden): the layer's input, cloned
        self._layer_index: torch.Tensor | None = None  # (batch, kept): this layer's survivors

    def _score(self, module, args, output):
        update = output[0] if isinstance(output, tuple) else output  # (batch, seq, hidden)
        batch, seq_len = update.shape[:2]
        selection = select_active(delta_norm(update), [seq_len] * batch, self.halt_ratio,
                                  self.protect_first, self.protect_last)
        self.active = torch.zeros(batch, seq_len, dtype=torch.bool, device=update.device)
        self.active.scatter_(1, selection.index, True)

    def _compact_start_cache(self, module, args, kwargs, output):
        # The start layer ran on every token; its cache keeps only the survivors.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            return output
        index = self._index()[:, None, :, None]
        layer = cache.layers[self.start_layer]
        if layer.keys.shape[2] != self.active.shape[1]:
            return output  # a sliding-window cache layer holds only the window's tail: keep it
        for name in ("keys", "values"):
            states = getattr(layer, name)
            setattr(layer, name, states.gather(2, index.expand(-1, states.shape[1], -1, states.shape[3])))
        return output

    def _index(self) -> torch.Tensor:
        """Active indices (batch, kept) from the boolean mask: a host sync every call."""
        kept = int(self.active[0].sum().item())
        return self.active.nonzero()[:, 1].view(self.active.shape[0], kept)

    def _gather(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self._full = hidden.clone()
        index = self._index()
        kwargs = dict(kwargs)
        if kwargs.get("position_embeddings") is not None:
            kwargs["position_embeddings"] = tuple(_gather_seq(t, index, 1) for t in kwargs["position_embeddings"])
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = _gather_seq(kwargs["position_ids"], index, 1)
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(index.shape[1], device=index.device)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):  # (batch or 1, 1, q, k): rows and columns of survivors
            kwargs["attention_mask"] = _gather_seq(_gather_seq(mask, index, 2), index, 3)
        self._layer_index = index
        return (_gather_seq(hidden, index, 1),) + tuple(args[1:]), kwargs

    def _scatter(self, module, args, kwargs, output):
        survivors = output[0] if isinstance(output, tuple) else output
        index = self._layer_index[:, :, None].expand(-1, -1, survivors.shape[-1])
        full = self._full.scatter_(1, index, survivors)
        self._full = self._layer_index = None
        return (full,) + tuple(output[1:]) if isinstance(output, tuple) else full

    @contextlib.contextmanager
    def __call__(self):
        """Install the hooks for the duration of the ``with`` block; the model is left untouched."""
        layers = self.model.model.layers
        handles = [layers[self.start_layer].self_attn.register_forward_hook(self._score),
                   layers[self.start_layer].register_forward_hook(self._compact_start_cache, with_kwargs=True)]
        for layer in layers[self.start_layer + 1:]:
            handles.append(layer.register_forward_pre_hook(self._gather, with_kwargs=True))
            handles.append(layer.register_forward_hook(self._scatter, with_kwargs=True))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.active = self._full = self._layer_index = None


@torch.no_grad()
def hooks_prefill(model: nn.Module, input_ids: torch.Tensor, halt_ratio: float, start_layer: int,
                  protect_first: int = 4, protect_last: int = 64):
    """Prefill with :class:`HookPress` installed: returns ``(logits (batch, vocab), cache)``."""
    press = HookPress(model, halt_ratio, start_layer, protect_first, protect_last)
    with press():
        output = model(input_ids, use_cache=True, logits_to_keep=1)
    return output.logits[:, -1].float(), output_cache(output)

"""The DASH prefill engine: one visible loop over the decoder layers.

Layers before the start layer run on every prompt token. At the start layer the attention
update U of every token is scored, the sequence is compacted ONCE to the active tokens, and
every later layer runs on the active tokens only, at their original positions. Halted tokens
are never copied back: only the cache and the last position's logits are read afterwards.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .adapters import PreNormAdapter, adapter_for, check_not_offloaded
from .config import DashConfig
from .cost import ideal_speedup
from .masks import KeyLayout, attention_mask
from .multimodal import PromptInputs, eligible_tokens, prompt_inputs
from .profiles import recommended_config
from .policy import ScoreContext, Selection, policy_scores, select_active

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillStats:
    """What DASH did to one prefill (all host-side numbers, per row where it says so)."""

    prompt_tokens: list[int]
    kept_tokens: list[int]
    start_layer: int
    num_layers: int
    kv_tokens_per_layer: list[int]
    ideal_speedup: float

    @property
    def halted_tokens(self) -> list[int]:
        return [n - k for n, k in zip(self.prompt_tokens, self.kept_tokens)]

    @property
    def kv_saved_fraction(self) -> float:
        """Fraction of KV-cache entries that plain prefill would hold and DASH does not."""
        full = sum(self.prompt_tokens) * self.num_layers
        return 1.0 - sum(self.kv_tokens_per_layer) / full


@dataclass
class PrefillResult:
    """The output of :func:`prefill`, and the state decoding continues from.

    cache : transformers.DynamicCache
        Layers >= start_layer hold only the active tokens.
    logits : (batch, vocab) float32
        Logits of the last prompt position.
    stats : PrefillStats
    active_index : (batch, kept) LongTensor or None
        Original indices of the active tokens (None when nothing was halted).
    scores : (batch, seq) float32 or None
        The policy's scores at the start layer.
    key_layouts : list[KeyLayout]
        Original positions of every layer's cached keys (shared by layers of a group).
    next_positions : (batch,) LongTensor
        Position of each row's next token: decoding continues at position T.
    rope_offset : (batch,) or (rows, batch) LongTensor or None
        Rotary position minus sequence position of generated tokens (M-RoPE models, whose
        image tokens take fewer rotary positions than tokens, have 3 rows); None when equal.
    """

    cache: DynamicCache
    logits: torch.Tensor
    stats: PrefillStats
    active_index: torch.Tensor | None
    scores: torch.Tensor | None
    key_layouts: list[KeyLayout] = field(repr=False)
    next_positions: torch.Tensor = field(repr=False)
    rope_offset: torch.Tensor | None = field(default=None, repr=False)


class _LayerInputs:
    """Rotary tables and masks for queries of one key layout, built once per layer type and
    moved once per device: the one place that lets layers live on different devices."""

    def __init__(self, adapter: PreNormAdapter, hidden: torch.Tensor, queries: torch.Tensor,
                 keys: KeyLayout | None, rope: torch.Tensor | None = None,
                 query_groups: torch.Tensor | None = None):
        self.adapter, self.queries, self.keys = adapter, queries, keys
        self.rope = queries if rope is None else rope
        self.query_groups = query_groups
        # Only dtype and device are needed: holding ``hidden`` itself would keep it alive.
        self.hidden = hidden.new_empty(0)
        self.built: dict[tuple[str, torch.device], tuple] = {}

    def get(self, layer_type: str, device: torch.device):
        if (layer_type, device) not in self.built:
            home = self.hidden.device
            if (layer_type, home) not in self.built:
                rotary = self.adapter.rotary(self.hidden, self.rope, layer_type)
                mask = None if self.keys is None else attention_mask(
                    self.adapter.config._attn_implementation, self.queries, self.keys,
                    self.adapter.window(layer_type), self.hidden.dtype, self.query_groups)
                self.built[layer_type, home] = (rotary, mask)
            rotary, mask = self.built[layer_type, home]
            self.built[layer_type, device] = (
                tuple(t.to(device) for t in rotary), None if mask is None else mask.to(device))
        return self.built[layer_type, device]


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _gather_tokens(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``tensor`` (batch, seq, dim) at ``index`` (batch, kept)."""
    return tensor.gather(1, index[:, :, None].expand(-1, -1, tensor.shape[-1]))


def _gather_rope(rope: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """Rotary positions (batch, seq) or (rows, batch, seq) at ``index`` (batch, kept)."""
    if rope is None:
        return None
    return rope.gather(-1, index.expand(*rope.shape[:-2], *index.shape))


def _halted_index(selection: Selection, seq_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens a selection halts, ascending per row: (batch, seq - fewest kept) indices and,
    when rows keep different counts, which of those slots are real (filler slots are halted)."""
    active = selection.index
    is_active = torch.zeros(active.shape[0], seq_len, dtype=torch.int8, device=active.device)
    marks = 1 if selection.valid is None else selection.valid.to(torch.int8)
    is_active.scatter_(1, active, marks)
    halted = is_active.argsort(dim=-1, stable=True)[:, :seq_len - min(selection.kept_per_row)]
    if max(selection.kept_per_row) == min(selection.kept_per_row):
        return halted, None
    return halted, is_active.gather(1, halted) == 0


def _keep_cached(cache: DynamicCache, layer_idx: int, index: torch.Tensor) -> None:
    """Drop the halted tokens' keys and values from one cache layer (batch, heads, seq, dim)."""
    layer = cache.layers[layer_idx]
    slots = index[:, None, :, None]
    for name in ("keys", "values"):
        states = getattr(layer, name)
        setattr(layer, name, states.gather(2, slots.expand(-1, states.shape[1], -1, states.shape[3])))


def _crop_to_window(cache: DynamicCache, layer_idx: int, count: int) -> None:
    """Keep the last ``count`` keys/values of a sliding-window layer (copied, so the rest is freed).

    Positions grow along the cache, so the keys a future token can still see (original positions
    within the window) are among the last window-1 entries, compacted or not.
    """
    layer = cache.layers[layer_idx]
    if layer.keys.shape[2] > count:
        layer.keys = layer.keys[:, :, -count:].clone()
        layer.values = layer.values[:, :, -count:].clone()


def _validate(model, input_ids, attention_mask, configs=()) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """Checks at the boundary; returns 2-D ids, the mask (None without padding), row lengths."""
    for config in configs:
        if not isinstance(config, DashConfig):
            raise ValueError(f"config must be a DashConfig, e.g. DashConfig(halt_ratio=0.5); got {type(config).__name__}")
    if isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(r, torch.Tensor) for r in input_ids):
        input_ids = [r.tolist() for r in input_ids]  # a list of 1-D id tensors, one per row
    if isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(r, (list, tuple)) for r in input_ids):
        widths = sorted({len(r) for r in input_ids})
        if len(widths) > 1:
            raise ValueError(f"rows of input_ids have different lengths ({widths[0]} to {widths[-1]}): "
                             "left-pad them and pass attention_mask, or use generate(), which pads")
    if not isinstance(input_ids, torch.Tensor):
        try:
            input_ids = torch.as_tensor(input_ids)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError("input_ids must be a (batch, seq) tensor or list of integer token ids; "
                             f"got {type(input_ids).__name__}") from None
    if input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input_ids must be integer token ids (torch.long); got dtype {input_ids.dtype}: "
                         "pass tokenizer output, or .long() the tensor")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq) or (seq,); got {tuple(input_ids.shape)}")
    batch, seq_len = input_ids.shape
    if seq_len == 0 or batch == 0:
        raise ValueError("the prompt is empty: pass at least one token")
    vocab = model.get_input_embeddings().num_embeddings
    lowest, highest = (int(v) for v in torch.aminmax(input_ids))  # a host sync, before any layer runs
    if lowest < 0 or highest >= vocab:
        raise ValueError(f"input_ids must lie in [0, {vocab}) (the model's vocabulary); got ids from "
                         f"{lowest} to {highest}: tokenize with this model's tokenizer")
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(
            f"the prompt has {seq_len} tokens but the model's context is {limit}; shorten the prompt"
        )
    if attention_mask is None:
        return input_ids, None, [seq_len] * batch
    attention_mask = torch.as_tensor(attention_mask)
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    lengths = attention_mask.sum(-1).tolist()  # the one host sync, before any layer runs
    if min(lengths) == 0:
        raise ValueError("a row of the batch is empty (all padding): remove it")
    expected = torch.arange(seq_len, device=attention_mask.device)[None] >= seq_len - attention_mask.new_tensor(lengths)[:, None]
    if not torch.equal(attention_mask.bool(), expected):
        raise ValueError(
            "rows must be left-padded (padding first, prompt last); set tokenizer.padding_side = 'left'")
    if min(lengths) == seq_len:
        return input_ids, None, lengths
    return input_ids, attention_mask.bool(), lengths


def _score_context(config: DashConfig, adapter: PreNormAdapter, layer, hidden: torch.Tensor,
                   output: torch.Tensor, rotary, cached, layout: KeyLayout) -> ScoreContext:
    """What the policy may read at the start layer (``output``: the attention output, see
    ``adapters.PreNormAdapter.attention_output``; ``cached``: the layer's cache entry)."""
    window = min(max(config.protect_last, 1), hidden.shape[1])
    padding = None if layout.valid is None else ~layout.valid.to(hidden.device)
    return ScoreContext(
        output=output, hidden=hidden, config=config, padding=padding,
        window_queries=lambda: adapter.queries(layer, hidden[:, -window:],
                                               tuple(t[:, -window:] for t in rotary)),
        keys=cached.keys, values=cached.values, positions=layout.positions.to(hidden.device),
        scaling=layer.self_attn.scaling)


class _Pass:
    """One prefill in flight: the hidden states, the cache and where its keys sit.

    Passes fork after the shared layers, so several policies can reuse the trunk before their
    common start layer (the evaluation compares policies this way).
    """

    def __init__(self, adapter: PreNormAdapter, prompt: PromptInputs,
                 padding_mask: torch.Tensor | None, lengths: list[int]):
        self.adapter, self.lengths = adapter, lengths
        self.layer_types = adapter.layer_types()
        self.hidden = prompt.embeds
        device = self.hidden.device
        batch, seq_len = self.hidden.shape[:2]
        if padding_mask is None:
            valid = None
            positions = torch.arange(seq_len, device=device)[None].expand(batch, -1)
        else:
            valid = padding_mask.to(device)
            positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
        groups = None if prompt.groups is None else prompt.groups.to(device)
        self.rope = None if prompt.rope is None else prompt.rope.to(device)
        # Generated tokens follow the largest rotary position (M-RoPE), else the sequence.
        self.rope_offset = None
        if self.rope is not None:
            following = self.rope.reshape(-1, batch, seq_len).amax(dim=(0, 2)) + 1
            offset = following - (positions[:, -1] + 1)
            # (rows, batch) for M-RoPE: decoding passes every rotary row, as the model does.
            self.rope_offset = offset if self.rope.dim() == 2 else offset.expand(self.rope.shape[0], -1)
        self.layout = KeyLayout(positions, valid, seq_len, groups=groups)
        self.inputs = _LayerInputs(adapter, self.hidden, positions, self.layout, self.rope, groups)
        self.cache = DynamicCache()
        self.layouts: list[KeyLayout] = []
        self.tails: dict[tuple[int, int], KeyLayout] = {}
        self.selection: Selection | None = None
        self.scores: torch.Tensor | None = None
        # frozen_keys: hidden states of the halted tokens and their rotary tables.
        self.frozen: torch.Tensor | None = None
        self.frozen_inputs: _LayerInputs | None = None

    def fork(self) -> _Pass:
        """A pass that continues from here; shares tensors (nothing is modified in place)."""
        twin = copy.copy(self)
        twin.cache = DynamicCache()
        twin.cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        twin.layouts = list(self.layouts)
        twin.tails = dict(self.tails)
        return twin

    def run(self, layers: range, start: int | None = None, config: DashConfig | None = None,
            eligible: tuple[torch.Tensor, list[int]] | None = None) -> None:
        """Run ``layers``; at ``start``, halt tokens as ``config`` says and compact once
        (only ``eligible`` tokens, with their per-row counts, when given)."""
        adapter = self.adapter
        for idx in layers:
            layer = adapter.layers[idx]
            layer_device = _device_of(layer)
            hidden = self.hidden.to(layer_device)
            rotary, mask = self.inputs.get(self.layer_types[idx], layer_device)
            if self.frozen is not None:
                # Halted tokens stay visible: their keys/values from the frozen state go first.
                frozen_rotary, _ = self.frozen_inputs.get(self.layer_types[idx], layer_device)
                keys, values = adapter.keys_values(layer, self.frozen.to(layer_device), frozen_rotary)
                self.cache.update(keys, values, idx)
            output = adapter.attention_output(layer, hidden, rotary, mask, self.cache)
            update = adapter.residual_update(layer, output)
            layer_layout = self.layout
            if idx == start:
                # The halting decision: score, select, compact once.
                self.scores = policy_scores(_score_context(config, adapter, layer, hidden, output,
                                                           rotary, self.cache.layers[idx], self.layout))
                padding = None if self.layout.valid is None else ~self.layout.valid.to(layer_device)
                self.selection = select_active(self.scores, self.lengths, config.halt_ratio,
                                               config.protect_first, config.protect_last, padding,
                                               eligible)
                hidden = hidden + update
                if self.selection.index.shape[1] < hidden.shape[1] or self.selection.valid is not None:
                    hidden, layer_layout = self._compact(hidden, idx, layer_device, config.frozen_keys)
            else:
                hidden = hidden + update
            self.hidden = adapter.feed_forward(layer, hidden)
            self.layouts.append(self._cropped_layout(idx, layer_layout))

    def _cropped_layout(self, layer_idx: int, layout: KeyLayout) -> KeyLayout:
        """Crop a sliding-window layer's cache as HF does; the layout of what the layer keeps."""
        window = self.adapter.window(self.layer_types[layer_idx])
        if window is None or not layout.ordered or layout.num_keys <= window - 1:
            return layout
        _crop_to_window(self.cache, layer_idx, window - 1)
        key = (id(layout), window)
        if key not in self.tails:
            self.tails[key] = layout.tail(window - 1)
        return self.tails[key]

    def _compact(self, hidden: torch.Tensor, layer_idx: int, device: torch.device,
                 frozen_keys: bool) -> tuple[torch.Tensor, KeyLayout]:
        """Keep only the active tokens: hidden states, the key layout and (unless halted keys
        stay visible) this layer's cache. Returns the active hidden states and the layout of
        what this layer's cache holds."""
        index = self.selection.index.to(device)
        home = self.layout.positions.device
        valid = None if self.selection.valid is None else self.selection.valid.to(home)
        active = self.layout.gather(index.to(home), valid)
        cached = self.layout
        # Rotary tables and masks are built on the home device and moved once per layer device.
        template = torch.empty(0, dtype=hidden.dtype, device=home)
        if frozen_keys:
            halted, halted_valid = _halted_index(self.selection, hidden.shape[1])
            self.frozen = _gather_tokens(hidden, halted.to(device))
            frozen = self.layout.gather(halted.to(home), None if halted_valid is None else halted_valid.to(home))
            self.frozen_inputs = _LayerInputs(self.adapter, template, frozen.positions, None,
                                              _gather_rope(self.rope, halted.to(home)))
            self.layout = frozen.concat(active)
        else:
            _keep_cached(self.cache, layer_idx, index)
            self.layout = cached = active
        hidden = _gather_tokens(hidden, index)
        self.rope = _gather_rope(self.rope, index.to(home))
        self.inputs = _LayerInputs(self.adapter, template, active.positions, self.layout,
                                   self.rope, active.groups)
        return hidden, cached

    def finish(self, model, start: int) -> PrefillResult:
        lengths, num_layers = self.lengths, len(self.adapter.layers)
        kept = self.selection.kept_per_row if self.selection is not None else lengths
        halted_any = self.selection is not None and kept != lengths
        frozen_keys = self.frozen is not None
        before = num_layers if frozen_keys else min(start, num_layers)
        seq_len = self.layout.span
        stats = PrefillStats(
            prompt_tokens=lengths, kept_tokens=kept, start_layer=start, num_layers=num_layers,
            kv_tokens_per_layer=[sum(lengths)] * before + [sum(kept)] * (num_layers - before),
            ideal_speedup=ideal_speedup(model.config, seq_len, start, max(kept) / seq_len, frozen_keys),
        )
        return PrefillResult(
            cache=self.cache, logits=self.adapter.logits(self.hidden[:, -1]), stats=stats,
            active_index=self.selection.index if halted_any else None, scores=self.scores,
            key_layouts=self.layouts,
            # The last token is real in every row (left padding): the next position follows it.
            next_positions=self.layout.positions[:, -1] + 1,
            rope_offset=self.rope_offset,
        )


@torch.no_grad()
def prefill(model, input_ids, config: DashConfig | None = None,
            attention_mask: torch.Tensor | None = None, *,
            vision_config: DashConfig | None = None, **multimodal) -> PrefillResult:
    """Prefill a prompt with Delta Attention Selective Halting.

    Parameters
    ----------
    model : a supported ``*ForCausalLM``, or a supported vision-language
        ``*ForConditionalGeneration`` (see ``adapters.ADAPTERS`` and ``adapters.VLM_ADAPTERS``).
    input_ids : (batch, seq) or (seq,) token ids; batches must be left-padded.
    config : DashConfig, default: the model's recommended setting
        (:func:`dash_prefill.profiles.recommended_config`); halting in the decoder.
    attention_mask : (batch, seq) 1 for tokens, 0 for padding; optional.
    vision_config : DashConfig, optional
        VLMs: halting inside the vision encoder as well (see :mod:`dash_prefill.vision`).
    **multimodal :
        VLMs: the processor's other outputs (``pixel_values``, ``image_grid_thw``,
        ``mm_token_type_ids``, ``token_type_ids``, ...), passed as the model's forward takes them.

    Returns
    -------
    PrefillResult with the cache, the last position's logits (batch, vocab) and the stats.
    """
    return prefill_branches(model, input_ids, [config or recommended_config(model)], attention_mask,
                            vision_config=vision_config, **multimodal)[0]


@torch.no_grad()
def prefill_branches(model, input_ids, configs: list[DashConfig],
                     attention_mask: torch.Tensor | None = None, *,
                     vision_config: DashConfig | None = None, **multimodal) -> list[PrefillResult]:
    """Prefill one prompt under several configs, running the layers before their earliest
    start layer once. Equal to calling :func:`prefill` per config; faster for comparisons."""
    adapter = adapter_for(model)
    check_not_offloaded(model)  # once per prompt, not per decoded token
    input_ids, padding_mask, lengths = _validate(model, input_ids, attention_mask, configs)
    prompt = prompt_inputs(adapter, input_ids, None if padding_mask is None else padding_mask.long(),
                           multimodal, vision_config)
    eligible = [eligible_tokens(c, prompt, padding_mask) for c in configs]
    num_layers = len(adapter.layers)
    starts = [c.resolve_start_layer(num_layers) if c.halts else num_layers for c in configs]
    trunk = _Pass(adapter, prompt, padding_mask, lengths)
    shared = min(starts)
    trunk.run(range(shared))
    results = []
    for config, start, allowed in zip(configs, starts, eligible):
        branch = trunk.fork() if len(configs) > 1 else trunk
        branch.run(range(shared, num_layers), start, config, allowed)
        results.append(branch.finish(model, start))
    return results


@torch.no_grad()
def decode_step(model, state: PrefillResult, token_ids: torch.Tensor) -> torch.Tensor:
    """Run one token per row (batch, 1) at the next original positions; advance ``state``.

    Decoding is ordinary attention over the DASH cache; every layer sees every new token.
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
    layer_types = adapter.layer_types()
    hidden = adapter.embed(token_ids.to(adapter.base.embed_tokens.weight.device))
    steps = torch.arange(token_ids.shape[1], device=hidden.device)
    positions = state.next_positions[:, None].to(hidden.device) + steps
    rope = None if state.rope_offset is None else positions + state.rope_offset[..., None].to(hidden.device)
    grown: dict[int, tuple[KeyLayout, _LayerInputs]] = {}
    layouts = []
    for idx, layer in enumerate(adapter.layers):
        old = state.key_layouts[idx]
        if id(old) not in grown:
            new = old.append(positions.to(old.positions.device), old.span + token_ids.shape[1])
            grown[id(old)] = (new, _LayerInputs(adapter, hidden, positions, new, rope))
        layout, inputs = grown[id(old)]
        layer_device = _device_of(layer)
        hidden = hidden.to(layer_device)
        rotary, mask = inputs.get(layer_types[idx], layer_device)
        hidden = adapter.feed_forward(layer, hidden + adapter.attention_update(layer, hidden, rotary, mask, state.cache))
        layouts.append(layout)
    state.key_layouts = layouts
    state.next_positions = state.next_positions + token_ids.shape[1]
    return adapter.logits(hidden)

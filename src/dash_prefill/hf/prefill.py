"""DASH prefill: one visible loop over the decoder layers.

Layers before the start layer run on every prompt token. At the start layer the attention
output U of every token is scored (``policy.py``), the sequence is compacted to the active
tokens (once per gate: once, unless ``later_gates`` adds more), and every later layer runs on
the active tokens only, at their original positions (``cache.KeyLayout``). Halted tokens are
never copied back: only the cache and the last position's logits are read afterwards.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from dash_prefill.hf.adapters import PreNormAdapter, adapter_for, check_not_offloaded, context_limit, device_of
from dash_prefill.hf.cache import KeyLayout, attention_mask, cached_tokens, crop_to_window, keep_cached, kv_entries
from dash_prefill.core.config import DashConfig
from dash_prefill.core.cost import ideal_speedup
from dash_prefill.hf.multimodal import PromptInputs, eligible_tokens, prompt_inputs
from dash_prefill.core.policy import Eligibility, ScoreContext, Selection, policy_scores, select_among_survivors
from dash_prefill.core.profiles import config_or_recommended
from dash_prefill.hf.attention import SparsePrompt, prefill_attention_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillStats:
    """What DASH did to one prefill (all host-side numbers, per row where it says so).

    kv_tokens_per_layer : key/value entries each layer's cache holds, summed over the batch,
        exactly the cache's sizes (sliding-window layers keep their last window - 1 entries;
        padding and filler slots count, as they take memory).
    plain_kv_tokens_per_layer : what Hugging Face's cache would hold for the same batch.
    """

    prompt_tokens: list[int]
    kept_tokens: list[int]
    start_layer: int
    num_layers: int
    kv_tokens_per_layer: list[int]
    ideal_speedup: float
    plain_kv_tokens_per_layer: list[int] | None = None

    @property
    def halted_tokens(self) -> list[int]:
        return [n - k for n, k in zip(self.prompt_tokens, self.kept_tokens)]

    @property
    def kv_saved_fraction(self) -> float:
        """Fraction of the KV-cache entries plain prefill would hold that DASH does not."""
        plain = self.plain_kv_tokens_per_layer or [sum(self.prompt_tokens)] * self.num_layers
        return 1.0 - sum(self.kv_tokens_per_layer) / sum(plain)


@dataclass
class PrefillResult:
    """The output of :func:`prefill`, and the state decoding continues from.

    cache : transformers.DynamicCache
        Layers >= start_layer hold only the active tokens.
    logits : (batch, vocab) float32
        Logits of the last prompt position.
    stats : PrefillStats
    active_mask : (batch, seq) BoolTensor
        True at the prompt tokens computed past the last gate (every prompt token when nothing
        halts); False at halted tokens and padding. ``active_mask[i].sum()`` is
        ``stats.kept_tokens[i]``.
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
    active_mask: torch.Tensor
    scores: torch.Tensor | None
    key_layouts: list[KeyLayout] = field(repr=False)
    next_positions: torch.Tensor = field(repr=False)
    rope_offset: torch.Tensor | None = field(default=None, repr=False)


class LayerInputs:
    """Rotary tables and masks for queries at ``positions`` over keys laid out as ``keys``:
    built once per layer type on the home device (the embeddings'), moved once per layer
    device (layers may live on different GPUs)."""

    def __init__(self, adapter: PreNormAdapter, dtype: torch.dtype, positions: torch.Tensor,
                 keys: KeyLayout | None, rope: torch.Tensor | None = None,
                 query_blocks: torch.Tensor | None = None):
        self.adapter, self.positions, self.keys = adapter, positions, keys
        self.rope = positions if rope is None else rope
        self.query_blocks = query_blocks
        self.like = torch.empty(0, dtype=dtype, device=positions.device)  # dtype and device only
        self.built: dict[tuple[str, torch.device], tuple] = {}

    def get(self, layer_idx: int, device: torch.device) -> tuple[tuple, torch.Tensor | None]:
        """(cos, sin) and the mask (or None) of layer ``layer_idx``, on ``device``."""
        adapter, home = self.adapter, self.like.device
        layer_type = adapter.layer_types[layer_idx]
        if (layer_type, home) not in self.built:
            rotary = adapter.rotary(self.like, self.rope, layer_idx)
            mask = None if self.keys is None else attention_mask(
                adapter.config._attn_implementation, self.positions, self.keys,
                adapter.windows[layer_idx], self.like.dtype, self.query_blocks)
            self.built[layer_type, home] = (rotary, mask)
        if (layer_type, device) not in self.built:
            rotary, mask = self.built[layer_type, home]
            self.built[layer_type, device] = (
                tuple(t.to(device) for t in rotary), None if mask is None else mask.to(device))
        return self.built[layer_type, device]


def layer_step(adapter: PreNormAdapter, layer, hidden: torch.Tensor, rotary, mask, cache,
               gate=None, sparse: SparsePrompt | None = None) -> torch.Tensor:
    """One decoder layer, shared by prefill, decoding and ``inspect``.

    hidden : (batch, seq, hidden), the residual stream entering the layer.
    gate : optional ``gate(h + U, U) -> (batch, kept, hidden)``, run between the attention and
        the feed-forward sublayer, where U (batch, seq, hidden) is the attention output DASH
        scores: at the start layer it halts tokens and compacts the sequence; ``inspect`` reads
        U there.
    sparse : the prompt's block-sparse attention (layers before the first gate), or None.
    Returns the residual stream leaving the layer. U is not held through the feed-forward
    sublayer, so the peak memory is the model's own layer's.
    """
    output = adapter.attention_output(layer, hidden, rotary, mask, cache, sparse)  # U: (batch, seq, hidden)
    hidden = hidden + adapter.residual_update(layer, output)
    if gate is not None:
        hidden = gate(hidden, output)  # (batch, kept, hidden)
    del output
    return adapter.feed_forward(layer, hidden)


@dataclass(frozen=True)
class Gate:
    """Where and how one prefill halts: the config, the gate's layer index, and the record of
    which tokens may halt and how many each row keeps from there on (``policy.Eligibility``).
    A config with ``later_gates`` has several, the start layer's first."""

    config: DashConfig
    start_layer: int
    eligibility: Eligibility


class PrefillState:
    """One prefill in flight: the residual stream of the tokens still computed, where they sit,
    and the cache.

    hidden : (batch, seq or kept, hidden)
    layout : KeyLayout of those tokens (original positions, real tokens, Gemma-3 image blocks)
    rope : (batch, seq) or (3, batch, seq) rotary positions (M-RoPE), or None (= positions)
    cache : DynamicCache; layouts : the KeyLayout of what each finished layer's cache holds.
    sparse : SparsePrompt of block-sparse attention before the first gate (density < 1), or None.
    later_sparse : the same after the first gate (a config's later_density < 1, set at each gate:
        a row's filler slots lead it, like left padding), or None.
    """

    def __init__(self, adapter: PreNormAdapter, prompt: PromptInputs, padding_mask: torch.Tensor | None,
                 lengths: list[int], density: float = 1.0):
        self.adapter, self.lengths = adapter, lengths
        self.hidden = prompt.embeds  # (batch, seq, hidden)
        device = self.hidden.device
        batch, self.seq_len = self.hidden.shape[:2]
        if padding_mask is None:
            real = None
            positions = torch.arange(self.seq_len, device=device)[None].expand(batch, -1)
        else:
            real = padding_mask.to(device)
            positions = (real.long().cumsum(-1) - 1).clamp_min(0)  # left padding: first token at 0
        blocks = None if prompt.blocks is None else prompt.blocks.to(device)
        self.rope = None if prompt.rope is None else prompt.rope.to(device)
        self.rope_offset = self._rope_offset(positions)
        self.layout = KeyLayout(positions, real, self.seq_len, blocks=blocks)
        self.inputs = LayerInputs(adapter, self.hidden.dtype, positions, self.layout, self.rope, blocks)
        self.cache = DynamicCache()
        self.layouts: list[KeyLayout] = []
        self.cropped: dict[int, KeyLayout] = {}  # window -> the cropped layout, until the next compaction
        self.selection: Selection | None = None
        self.scores: torch.Tensor | None = None
        if density < 1.0:
            refuse_image_blocks(prompt, "density")
        self.sparse = SparsePrompt.of(density, lengths, self.seq_len, device) if density < 1.0 else None
        self.later_sparse: SparsePrompt | None = None

    def _rope_offset(self, positions: torch.Tensor) -> torch.Tensor | None:
        """Generated tokens follow the largest rotary position (M-RoPE), else the sequence."""
        if self.rope is None:
            return None
        batch, seq_len = positions.shape
        following = self.rope.reshape(-1, batch, seq_len).amax(dim=(0, 2)) + 1
        offset = following - (positions[:, -1] + 1)
        # (rows, batch) for M-RoPE: decoding passes every rotary row, as the model does.
        return offset if self.rope.dim() == 2 else offset.expand(self.rope.shape[0], -1)

    def fork(self) -> PrefillState:
        """A state that continues from here; shares tensors (nothing is modified in place)."""
        twin = copy.copy(self)
        twin.cache = copy.copy(self.cache)
        twin.cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        twin.layouts, twin.cropped = list(self.layouts), dict(self.cropped)
        return twin

    def halt(self, gate: Gate, layer, layer_idx: int, hidden: torch.Tensor, after: torch.Tensor,
             output: torch.Tensor, rotary) -> torch.Tensor:
        """The halting decision at a gate: score the tokens still computed, select the active
        set, compact (at the start layer every token is scored; at a later gate, the survivors).
        hidden, after, output : (batch, seq, hidden) = h, h + U, U.
        Returns h + U of the active tokens (batch, kept, hidden)."""
        context = self._score_context(gate.config, layer, layer_idx, hidden, output, rotary)
        if self.selection is None:  # the first gate: every prompt token is still computed
            self.scores = policy_scores(context)
            self.selection = local = gate.eligibility.select(self.scores)
        else:
            self.selection, local = select_among_survivors(context, gate.eligibility, self.selection, self.seq_len)
        if gate.config.later_density < 1.0:
            self.later_sparse = later_sparse(gate.config.later_density, local)
        if local.index.shape[1] == after.shape[1] and local.filled is None:
            return after  # nothing halts
        return self.compact(after, local, layer_idx)

    def _score_context(self, config: DashConfig, layer, layer_idx: int, hidden: torch.Tensor,
                       output: torch.Tensor, rotary) -> ScoreContext:
        window = min(max(config.protect_last, 1), hidden.shape[1])
        cached = self.cache.layers[layer_idx]
        padding = None if self.layout.real is None else ~self.layout.real.to(hidden.device)
        return ScoreContext(
            output=output, hidden=hidden, config=config, padding=padding,
            window_queries=lambda: self.adapter.queries(layer, hidden[:, -window:],
                                                        tuple(t[:, -window:] for t in rotary)),
            keys=cached.keys, values=cached.values, positions=self.layout.positions.to(hidden.device),
            scaling=layer.self_attn.scaling, sliding_window=self.adapter.windows[layer_idx])

    def compact(self, hidden: torch.Tensor, selection: Selection, layer_idx: int) -> torch.Tensor:
        """Keep only the active tokens, all at once: their hidden states, original positions,
        rotary rows and key layout, and this layer's cache.
        hidden : (batch, seq, hidden) -> (batch, kept, hidden)."""
        home = self.layout.positions.device
        index = selection.index.to(home)  # (batch, kept)
        filled = None if selection.filled is None else selection.filled.to(home)
        active = self.layout.gather(index, filled)
        keep_cached(self.cache, layer_idx, index.to(hidden.device))
        self.layout, self.cropped = active, {}
        if self.rope is not None:  # (batch, seq) or (3, batch, seq) -> (..., kept)
            self.rope = self.rope.gather(-1, index.expand(*self.rope.shape[:-2], *index.shape))
        self.inputs = LayerInputs(self.adapter, hidden.dtype, active.positions, self.layout, self.rope,
                                  active.blocks)
        return hidden.gather(1, index.to(hidden.device)[:, :, None].expand(-1, -1, hidden.shape[-1]))

    def finish_layer(self, layer_idx: int) -> None:
        """Crop a sliding-window layer's cache as HF does; record the layout of what it keeps
        (one object per window between compactions: decoding groups layers by it)."""
        window = self.adapter.windows[layer_idx]
        kept = crop_to_window(self.cache, layer_idx, self.layout, window)
        self.layouts.append(self.cropped.setdefault(window, kept))

    def _active_mask(self) -> torch.Tensor:
        """(batch, seq) True at the prompt tokens still computed (filler slots and padding are not)."""
        selection, home = self.selection, self.layout.positions.device
        if selection is None:  # never compacted: the layout is the prompt's
            real = self.layout.real
            return torch.ones_like(self.layout.positions, dtype=torch.bool) if real is None else real
        marks = True if selection.filled is None else selection.filled.to(home)
        active = torch.zeros(len(self.lengths), self.seq_len, dtype=torch.bool, device=home)
        return active.scatter(1, selection.index.to(home), marks)

    def result(self, model, gates: list[Gate]) -> PrefillResult:
        """The cache, the last position's logits and the stats."""
        num_layers, lengths = len(self.adapter.layers), self.lengths
        kept = self.selection.kept_per_row if self.selection is not None else lengths
        batch = len(lengths)
        start = gates[0].start_layer if gates else num_layers
        fractions = [(g.start_layer, max(g.eligibility.kept) / self.seq_len) for g in gates] or [(start, 1.0)]
        stats = PrefillStats(
            prompt_tokens=lengths, kept_tokens=kept, start_layer=start, num_layers=num_layers,
            kv_tokens_per_layer=kv_entries(self.cache),
            ideal_speedup=ideal_speedup(model.config, self.seq_len, *fractions[0], fractions[1:],
                                        density=self.sparse.density if self.sparse else 1.0,
                                        later_density=gates[0].config.later_density if gates else 1.0),
            plain_kv_tokens_per_layer=[batch * cached_tokens(self.seq_len, w) for w in self.adapter.windows],
        )
        return PrefillResult(
            cache=self.cache, logits=self.adapter.logits(self.hidden[:, -1]), stats=stats,
            active_mask=self._active_mask(), scores=self.scores,
            key_layouts=self.layouts,
            # The last token is real in every row (left padding): the next position follows it.
            next_positions=self.layout.positions[:, -1] + 1,
            rope_offset=self.rope_offset,
        )


def later_sparse(density: float, selection: Selection) -> SparsePrompt:
    """Block-sparse attention over the tokens a gate keeps: a row's filler slots are its first
    (they stand at its left padding, since no row keeps more tokens than a longer one), so they
    play the part of padding and a row's blocks hold the tokens it keeps alone."""
    index = selection.index
    if selection.filled is None:
        return SparsePrompt(density, torch.zeros(index.shape[0], dtype=torch.long, device=index.device))
    return SparsePrompt(density, (~selection.filled).sum(-1))


def run_layers(state: PrefillState, layers: range, gates: list[Gate] = ()) -> None:
    """The prefill loop: run ``layers`` on ``state``; at a gate's layer halt tokens and compact
    the sequence (once with one gate), so every later layer runs on the active tokens only.
    Layers before the first gate attend block-sparse when ``state.sparse`` is set, the
    full-attention layers after it that are not gates when ``state.later_sparse`` is."""
    adapter = state.adapter
    at = {gate.start_layer: gate for gate in gates}
    dense_from = gates[0].start_layer if gates else len(adapter.layers)  # the first gate is dense
    later = any(gate.config.later_density < 1.0 for gate in gates)
    with prefill_attention_for(adapter.config, state.sparse is not None or later):
        for idx in layers:
            layer = adapter.layers[idx]
            hidden = state.hidden.to(device_of(layer))  # (batch, seq or kept, hidden)
            rotary, mask = state.inputs.get(idx, hidden.device)  # at the tokens' original positions
            halt = None
            if idx in at:
                def halt(after, output, layer=layer, idx=idx, hidden=hidden, rotary=rotary, gate=at[idx]):
                    return state.halt(gate, layer, idx, hidden, after, output, rotary)
            if idx < dense_from:
                sparse = state.sparse
            else:  # a sliding window spans original positions, not the kept tokens: those stay dense
                sparse = None if idx in at or adapter.windows[idx] is not None else state.later_sparse
            state.hidden = layer_step(adapter, layer, hidden, rotary, mask, state.cache, halt, sparse)
            state.finish_layer(idx)


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
    if input_ids.device.type == "cpu":  # ids already on a GPU are not read back (no host sync)
        vocab = model.get_input_embeddings().num_embeddings
        lowest, highest = (int(v) for v in torch.aminmax(input_ids))
        if lowest < 0 or highest >= vocab:
            raise ValueError(f"input_ids must lie in [0, {vocab}) (the model's vocabulary); got ids from "
                             f"{lowest} to {highest}: tokenize with this model's tokenizer")
    limit = context_limit(model)
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
    lengths = attention_mask.sum(-1)
    expected = torch.arange(seq_len, device=attention_mask.device)[None] >= seq_len - lengths[:, None]
    left_padded = (attention_mask.bool() == expected).all()
    # The one host sync of a padded batch, before any layer runs: compacted widths need lengths.
    *lengths, left_padded = torch.cat([lengths, left_padded[None].long()]).tolist()
    if min(lengths) == 0:
        raise ValueError("a row of the batch is empty (all padding): remove it")
    if not left_padded:
        raise ValueError(
            "rows must be left-padded (padding first, prompt last); set tokenizer.padding_side = 'left'")
    if min(lengths) == seq_len:
        return input_ids, None, lengths
    return input_ids, attention_mask.bool(), lengths


def _prepare(model, input_ids, attention_mask, multimodal: dict, vision_config: DashConfig | None,
             configs=()) -> tuple[PreNormAdapter, PromptInputs, torch.Tensor | None, list[int]]:
    """The adapter, the decoder's inputs, the padding mask and the row lengths of a prompt."""
    adapter = adapter_for(model)
    check_not_offloaded(model)  # once per prompt, not per decoded token
    input_ids, padding_mask, lengths = _validate(model, input_ids, attention_mask, configs)
    prompt = prompt_inputs(adapter, input_ids, None if padding_mask is None else padding_mask.long(),
                           multimodal, vision_config)
    return adapter, prompt, padding_mask, lengths


def refuse_image_blocks(prompt: PromptInputs, field: str) -> None:
    """Block-sparse attention ignores the mask, where Gemma-3's bidirectional image blocks live."""
    if prompt.blocks is not None:
        raise ValueError(f"{field} < 1 (block-sparse attention) does not support Gemma-3 image blocks "
                         f"(bidirectional attention): use {field} 1 with images")


def _gates(config: DashConfig, adapter: PreNormAdapter, prompt: PromptInputs,
           padding_mask: torch.Tensor | None, lengths: list[int]) -> list[Gate]:
    """The gates of ``config`` on this prompt, the start layer's first; none for plain prefill
    (policy "none")."""
    if not config.scores_tokens:
        return []
    if config.later_density < 1.0:
        refuse_image_blocks(prompt, "later_density")
    device = prompt.embeds.device
    padding = None if padding_mask is None else ~padding_mask.to(device)
    eligible = eligible_tokens(config, prompt, padding_mask)
    return [Gate(config, layer, Eligibility.of_prompt(lengths, prompt.embeds.shape[1], ratio, config.protect_first,
                                                      config.protect_last, padding, eligible, device))
            for layer, ratio in config.resolve_gates(len(adapter.layers))]


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
    config : DashConfig, default: the model's recommended setting for this prompt length
        (:func:`dash_prefill.recommended_config`, logged at INFO); halting in the decoder.
    attention_mask : (batch, seq) 1 for tokens, 0 for padding; optional.
    vision_config : DashConfig, optional
        VLMs: halting inside the vision encoder as well (see :mod:`dash_prefill.hf.vision`).
    **multimodal :
        VLMs: the processor's other outputs (``pixel_values``, ``image_grid_thw``,
        ``mm_token_type_ids``, ``token_type_ids``, ...), passed as the model's forward takes them.

    Returns
    -------
    PrefillResult with the cache, the last position's logits (batch, vocab) and the stats.
    """
    adapter, prompt, padding_mask, lengths = _prepare(model, input_ids, attention_mask, multimodal,
                                                      vision_config, [] if config is None else [config])
    config = config_or_recommended(model, config, max(lengths))  # the longest row decides a batch
    gates = _gates(config, adapter, prompt, padding_mask, lengths)
    state = PrefillState(adapter, prompt, padding_mask, lengths, config.density)
    del prompt  # the state owns the embeddings: they are freed once the first layer has run
    run_layers(state, range(len(adapter.layers)), gates)
    return state.result(model, gates)


@torch.no_grad()
def prefill_branches(model, input_ids, configs: list[DashConfig],
                     attention_mask: torch.Tensor | None = None, *,
                     vision_config: DashConfig | None = None, **multimodal) -> list[PrefillResult]:
    """Prefill one prompt under several configs, running the layers before their earliest
    start layer once per density. Equal to calling :func:`prefill` per config; faster for
    comparisons."""
    adapter, prompt, padding_mask, lengths = _prepare(model, input_ids, attention_mask, multimodal,
                                                      vision_config, configs)
    num_layers = len(adapter.layers)
    branches = [_gates(config, adapter, prompt, padding_mask, lengths) for config in configs]
    results: dict[int, PrefillResult] = {}
    densities = list(dict.fromkeys(config.density for config in configs))
    for density in densities:
        group = [i for i, config in enumerate(configs) if config.density == density]
        shared = min(branches[i][0].start_layer if branches[i] else num_layers for i in group)
        trunk = PrefillState(adapter, prompt, padding_mask, lengths, density)
        if density == densities[-1]:
            del prompt  # the last trunk owns the embeddings: freed once its first layer has run
        run_layers(trunk, range(shared))
        for i in group:
            branch = trunk.fork() if len(group) > 1 else trunk
            run_layers(branch, range(shared, num_layers), branches[i])
            results[i] = branch.result(model, branches[i])
    return [results[i] for i in range(len(configs))]

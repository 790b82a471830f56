"""Halting policies: pure functions from tensors to a selection of active tokens.

A policy scores every prompt token at the start layer from one :class:`ScoreContext`; it is
registered by name in ``POLICIES`` (adding a policy touches this file only). This is where the
halting decision is made: an ``Eligibility`` records which tokens may halt and how many each row
keeps, and ``Eligibility.select`` (``select_active``) turns scores into the active set. The
engine never knows which policy produced the scores.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Callable

import torch


def delta_norm(update: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The DASH score Δ_t = ||U_t||₂, or ||U_t||₂ / ||h_t||₂ when ``hidden`` is given.

    update, hidden: (batch, seq, hidden_size) -> (batch, seq) float32.
    """
    norm = _float_norm(update)
    if hidden is None:
        return norm
    return norm / _float_norm(hidden).clamp_min(1e-6)


def _float_norm(x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """||x_t||₂ in float32 over the last dim, (..., seq, d) -> (..., seq), upcasting
    ``chunk`` tokens at a time: a whole float32 copy of a 128K-token bf16 tensor is 2 GiB more
    peak memory than the prefill otherwise needs."""
    return torch.cat([part.float().norm(dim=-1) for part in x.split(chunk, dim=-2)], dim=-1)


def window_attention(queries: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor,
                     key_positions: torch.Tensor, key_valid: torch.Tensor | None,
                     scaling: float, sliding_window: int | None = None) -> torch.Tensor:
    """Attention probabilities of the question window's queries over every key.

    Only the last queries are scored, so the full (seq, seq) attention matrix is never built;
    causal order follows original positions. On a sliding-window layer a query does not see a
    key ``sliding_window`` or more positions back, as the model's own mask.

    queries : (batch, heads, n, head_dim); keys : (batch, kv_heads, seq, head_dim);
    query_positions : (batch, n); key_positions, key_valid : (batch, seq).
    -> (batch, heads, n, seq) float32.
    """
    batch, heads, n, dim = queries.shape
    grouped = queries.float().view(batch, keys.shape[1], heads // keys.shape[1], n, dim)  # GQA groups
    logits = torch.einsum("bkgqd,bksd->bkgqs", grouped, keys.float()).reshape(batch, heads, n, -1) * scaling
    behind = query_positions[:, None, :, None] - key_positions[:, None, None, :]  # (batch, 1, n, seq)
    allowed = behind >= 0
    if sliding_window is not None:
        allowed &= behind < sliding_window
    if key_valid is not None:
        allowed &= key_valid[:, None, None, :]
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1)


def random_scores(batch: int, seq_len: int, seed: int, device: torch.device) -> torch.Tensor:
    """Uniform scores from a seeded CPU generator (same draw on every device): (batch, seq)."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, seq_len, generator=generator, device="cpu")
    return scores.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else scores.to(device)


def span_max(scores: torch.Tensor, width: int, padding: torch.Tensor | None = None,
             offset: int = 0) -> torch.Tensor:
    """Sliding maximum of ``scores`` (batch, seq) over ``width`` neighbouring tokens (odd): a
    token scores as high as the best token near it, so a number or a phrase is kept or halted
    whole. The span a high-ranked token at p lends its score to is [p - width//2 + offset,
    p + width//2 + offset] (``offset`` > 0: more of what follows it, where a needle's value
    follows the key the question names). Padding never lends its score to real tokens.
    -> (batch, seq)."""
    if width <= 1:
        return scores
    half = width // 2
    if abs(offset) > half:
        raise ValueError(f"the span offset ({offset}) must be at most half the pool width ({half})")
    scores = scores.float()
    if padding is not None:
        scores = scores.masked_fill(padding, float("-inf"))
    # pooled[t] = max(scores[t - half - offset : t + half - offset + 1]), -inf past the ends
    padded = torch.nn.functional.pad(scores[:, None], (half + offset, half - offset), value=float("-inf"))
    return torch.nn.functional.max_pool1d(padded, width, stride=1)[:, 0]


# ---------------------------------------------------------------------------- the interface


class ScoreContext:
    """What a policy may look at, at the start layer. Tensors are computed on first use.

    output : (batch, seq, hidden)
        The start layer's attention output, the tensor DASH scores (``U``; Gemma-3: before
        its post-attention norm).
    hidden : (batch, seq, hidden)
        The residual stream entering the start layer.
    config : DashConfig
    padding : (batch, seq) bool or None
        True at (left) padding.
    window : int
        The question window: the last ``max(protect_last, 1)`` prompt tokens.
    window_queries : () -> (batch, heads, window, head_dim)
        Rotated queries of the window's tokens at the start layer.
    keys, values : (batch, kv_heads, seq, head_dim)
        The start layer's keys and values of every token (its cache, before compaction).
    positions : (batch, seq)
        Original positions of the tokens.
    scaling : float
        The attention's softmax scale.
    sliding_window : int or None
        The layer's sliding window (None on a full-attention layer).
    all_reduce : (tensor) -> tensor, optional
        Tensor parallelism over ``ranks`` ranks: queries, keys and values hold this rank's heads
        only, and this sums a tensor over the ranks (every rank gets the same sum). None: every
        head is here.
    """

    def __init__(self, *, output, hidden, config, padding, window_queries, keys, values,
                 positions, scaling, sliding_window=None, all_reduce=None, ranks=1):
        self.output, self.hidden, self.config, self.padding = output, hidden, config, padding
        self.window = min(max(config.protect_last, 1), hidden.shape[1])
        self._window_queries, self.keys, self.values = window_queries, keys, values
        self.positions, self.scaling, self.sliding_window = positions, scaling, sliding_window
        self._all_reduce, self._ranks = all_reduce, ranks
        self._attention = None

    @property
    def batch(self) -> int:
        return self.hidden.shape[0]

    @property
    def seq_len(self) -> int:
        return self.hidden.shape[1]

    def attention(self) -> torch.Tensor:
        """(batch, heads, window, seq) attention probabilities of the question window."""
        if self._attention is None:
            valid = None if self.padding is None else ~self.padding
            self._attention = window_attention(
                self._window_queries(), self.keys, self.positions[:, -self.window:],
                self.positions, valid, self.scaling, self.sliding_window)
        return self._attention

    def heads_sum(self, per_head: torch.Tensor) -> torch.Tensor:
        """(batch, heads here, seq) -> (batch, seq): the sum over every head of the layer, those
        of the other tensor-parallel ranks included."""
        total = per_head.sum(dim=1)
        return total if self._all_reduce is None else self._all_reduce(total)

    def heads_mean(self, per_head: torch.Tensor) -> torch.Tensor:
        """(batch, heads here, seq) -> (batch, seq): the mean over every head of the layer (each
        tensor-parallel rank holds as many)."""
        return self.heads_sum(per_head) / (per_head.shape[1] * self._ranks)


Policy = Callable[[ScoreContext], torch.Tensor]
POLICIES: dict[str, Policy] = {}


def register(name: str, query_aware: bool) -> Callable[[Policy], Policy]:
    """Add a policy under ``name``: a pure function ScoreContext -> scores (batch, seq),
    higher meaning more worth computing further. ``query_aware`` policies read the question
    window (the prompt's last ``protect_last`` tokens); the others can serve a context shared
    by many questions."""
    def add(function: Policy) -> Policy:
        function.query_aware = query_aware
        POLICIES[name] = function
        return function
    return add


@register("dash", query_aware=False)
def dash(context: ScoreContext) -> torch.Tensor:
    """The paper's score: ||U_t|| (``score="relative"``: ||U_t|| / ||h_t||)."""
    relative = context.config.score == "relative"
    return delta_norm(context.output, context.hidden if relative else None)


@register("random", query_aware=False)
def random(context: ScoreContext) -> torch.Tensor:
    """The control: the same number of tokens halted uniformly at random (``seed``). The j-th
    token a row still computes (padding and filler slots skipped) scores the j-th draw of a
    generator seeded with ``seed``, so a row draws the same scores in any batch as alone."""
    draws = random_scores(1, context.seq_len, context.config.seed, context.hidden.device)
    draws = draws.expand(context.batch, -1)  # (batch, seq)
    if context.padding is None:
        return draws
    return draws.gather(1, _real_order(context.padding))


@register("attention", query_aware=True)
def attention(context: ScoreContext) -> torch.Tensor:
    """Attention received from the question window, mean over heads and queries (FastV /
    GemFilter); with ``pool`` > 1 the SnapKV / FastKV pooled window-attention ranking."""
    return context.heads_mean(context.attention().mean(dim=2))


@register("contribution", query_aware=True)
def contribution(context: ScoreContext) -> torch.Tensor:
    """What token t adds to the question window's attention output: Σ_h mean_q a_hqt ||v_ht||
    (attention weighted by the value norm: a token with a small value moves nothing even when
    attended to, as attention sinks do)."""
    heads = context.attention().mean(dim=2)  # (batch, heads, seq)
    values = context.values.float().norm(dim=-1)  # (batch, kv_heads, seq)
    values = values.repeat_interleave(heads.shape[1] // values.shape[1], dim=1)
    return context.heads_sum(heads * values)


@register("dash-question", query_aware=True)
def dash_question(context: ScoreContext) -> torch.Tensor:
    """||U_t|| and the question's attention together: the product of their per-row ranks
    (in (0, 1]), so a token survives when it still changes AND the question looks at it."""
    return _rank(dash(context), context.padding) * _rank(attention(context), context.padding)


def _real_order(padding: torch.Tensor) -> torch.Tensor:
    """(batch, seq) index of each token among its row's real tokens (padding: 0)."""
    return ((~padding).long().cumsum(-1) - 1).clamp_min(0)


def _rank(scores: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """Per-row rank of each score among the row's real tokens, scaled to (0, 1] (padding: 0);
    ties are ranked by position. (batch, seq) -> (batch, seq) float32."""
    scores = scores.float()
    if padding is not None:
        scores = scores.masked_fill(padding, float("-inf"))  # padding ranks first, then drops out
    order = scores.argsort(dim=-1, stable=True)
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(1, scores.shape[-1] + 1, device=scores.device).expand_as(order))
    if padding is None:
        return ranks.float() / scores.shape[-1]
    pads = padding.sum(-1, keepdim=True)
    return (ranks - pads).clamp_min(0).float() / (scores.shape[-1] - pads)


def policy_scores(context: ScoreContext) -> torch.Tensor:
    """Scores (batch, seq) of the configured policy, pooled over ``config.pool`` tokens."""
    scores = POLICIES[context.config.policy](context)
    return span_max(scores, context.config.pool, context.padding, context.config.pool_offset)


def halted_count(num_tokens: int, halt_ratio: float) -> int:
    """⌊ρ·T⌋ computed in decimal: ρ=0.29 halts 29 of 100 tokens (float ρ·T is 28.999…)."""
    return int(Fraction(str(halt_ratio)) * num_tokens)


def kept_count(num_tokens: int, halt_ratio: float, num_protected: int) -> int:
    """Tokens kept in a row of ``num_tokens``: T - ⌊ρ·T⌋, or more when protection forces it."""
    return min(num_tokens, max(num_tokens - halted_count(num_tokens, halt_ratio), num_protected))


def prompt_kept(num_tokens: int, halt_ratio: float, protect_first: int, protect_last: int) -> int:
    """Tokens a prompt of ``num_tokens`` keeps past a gate halting ``halt_ratio`` of it, its
    first and last windows (and its last token) protected: what each engine keeps of a row."""
    return kept_count(num_tokens, halt_ratio, min(num_tokens, protect_first + max(protect_last, 1)))


def protected_mask(padding: torch.Tensor | None, batch: int, seq_len: int, protect_first: int,
                   protect_last: int, device: torch.device) -> torch.Tensor:
    """Tokens that may never halt: first and last windows of each row, and the last token.

    Rows are left-padded (``padding`` (batch, seq) True at padding, or None): a row's first
    window starts at its first real token. -> (batch, seq) bool. No host-device copies.
    """
    position = torch.arange(seq_len, device=device)[None]
    last = position >= seq_len - max(protect_last, 1)
    if padding is None:
        return (position < protect_first) | last
    starts = padding.sum(-1, keepdim=True)
    first = (position >= starts) & (position < starts + protect_first)
    return (first | last) & ~padding


def host_to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A LongTensor of host ``values`` on ``device`` without a host sync (pinned, non-blocking)."""
    tensor = torch.tensor(values, dtype=torch.long, device="cpu")
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class Selection:
    """The active set chosen at the start layer.

    Attributes
    ----------
    index : LongTensor (batch, kept)
        Original sequence indices of the active tokens, ascending in each row.
    filled : BoolTensor (batch, kept) or None
        False at filler slots (rows that keep fewer tokens than the widest row): they are
        computed but never attended to. None when every slot holds a kept token.
    kept_per_row : list[int]
        Tokens kept in each row.
    """

    index: torch.Tensor
    filled: torch.Tensor | None
    kept_per_row: list[int]


@dataclass(frozen=True)
class Eligibility:
    """Which tokens may halt and how many each row keeps: the one record that the decoder's
    selection and the vision encoder's both rank against.

    Attributes
    ----------
    protected : BoolTensor (batch, seq)
        Tokens that never halt: the protection windows, the last token, non-image tokens under
        ``eligible="image"``, CLIP's class token.
    padding : BoolTensor (batch, seq) or None
        Left padding: never active, halted before anything else. None without padding.
    kept : list[int]
        Tokens each row keeps (host-side: it sets the compacted width).
    """

    protected: torch.Tensor
    padding: torch.Tensor | None
    kept: list[int]

    @classmethod
    def of_prompt(cls, lengths: list[int], seq_len: int, halt_ratio: float, protect_first: int,
                  protect_last: int, padding: torch.Tensor | None = None,
                  eligible: tuple[torch.Tensor, list[int]] | None = None,
                  device: torch.device | None = None) -> Eligibility:
        """The record of a left-padded prompt batch.

        lengths : real tokens per row. padding : (batch, seq) True at padding, derived from
        ``lengths`` when not given. eligible : ((batch, seq) bool, list[int]) the tokens that may
        halt at all (image tokens, protected ones excluded) and their count per row; each row
        then halts ``⌊ρ · count⌋`` of them and keeps everything else. Otherwise every row keeps
        ``kept_count`` of its own tokens, exactly as it would alone.
        """
        batch = len(lengths)
        device = device if device is not None else (padding.device if padding is not None else None)
        padded = min(lengths) < seq_len
        if padded and padding is None:
            starts = host_to_device([seq_len - n for n in lengths], device)
            padding = torch.arange(seq_len, device=device)[None, :] < starts[:, None]
        padding = padding if padded else None
        protected = protected_mask(padding, batch, seq_len, protect_first, protect_last, device)
        if eligible is None:
            kept = [prompt_kept(n, halt_ratio, protect_first, protect_last) for n in lengths]
        else:
            protected = protected | ~eligible[0].to(device)
            kept = [n - halted_count(e, halt_ratio) for n, e in zip(lengths, eligible[1])]
        return cls(protected, padding, kept)

    def select(self, scores: torch.Tensor) -> Selection:
        """Keep the ``kept`` highest-scoring tokens of every row (protected ones first, padding
        never); rows keeping fewer than the widest row get filler slots (their earliest other
        positions: left padding, before the kept tokens), so the batch stays rectangular.
        scores : (batch, seq), higher = more worth computing further, on the gate layer's
        device, which may not be the one this record was built on (the embeddings').
        The selection is on the scores' device."""
        batch, seq_len = scores.shape
        device = scores.device
        width = max(self.kept)
        if width == seq_len and self.padding is None:
            # Nothing halts: the identity selection needs no ranking.
            index = torch.arange(seq_len, device=device).expand(batch, seq_len)
            return Selection(index=index, filled=None, kept_per_row=self.kept)
        ranked = scores.float().masked_fill(self.protected.to(device), float("inf"))
        if self.padding is not None:
            ranked = ranked.masked_fill(self.padding.to(device), float("-inf"))
        # A stable sort breaks ties (pooled scores tie by construction) by position, so a row
        # keeps the same tokens in a left-padded batch as alone.
        best = ranked.sort(dim=-1, descending=True, stable=True).indices
        if min(self.kept) == width:
            return Selection(index=best[:, :width].sort(dim=-1).values, filled=None, kept_per_row=self.kept)
        # Rows keeping fewer tokens than the widest one fill the rest with their earliest other
        # slots: their left padding (a shorter row never keeps more), so filler leads a row.
        kept = host_to_device(self.kept, device)
        rank = torch.empty_like(best).scatter_(1, best, torch.arange(seq_len, device=device).expand(batch, -1))
        chosen = rank < kept[:, None]
        spare = ~chosen & ((~chosen).cumsum(-1) <= width - kept[:, None])
        index = (~(chosen | spare)).to(torch.int8).argsort(dim=-1, stable=True)[:, :width].contiguous()  # ascending
        return Selection(index=index, filled=chosen.gather(1, index), kept_per_row=self.kept)


def select_among_survivors(context: ScoreContext, eligibility: Eligibility, survivors: Selection,
                           prompt_len: int) -> tuple[Selection, Selection]:
    """A later gate: rank the tokens still computed (``survivors``, chosen at an earlier gate,
    scored by ``context``) in the prompt's index space (pooled over original neighbours; halted
    tokens and filler slots never lend a score nor return) and keep ``eligibility``'s count.
    Returns the selection in prompt indices and the same in indices of the tokens entering the
    gate. The HF and vLLM engines both decide a later gate here."""
    raw = POLICIES[context.config.policy](context).float()  # (batch, kept), on this gate's device
    index = survivors.index.to(raw.device)  # (batch, kept)
    filled = None if survivors.filled is None else survivors.filled.to(raw.device)
    if context.padding is not None:  # filler slots of rows that keep fewer tokens
        raw = raw.masked_fill(context.padding, float("-inf"))
    batch = raw.shape[0]
    scores = raw.new_full((batch, prompt_len), float("-inf")).scatter(1, index, raw)
    alive = torch.zeros(batch, prompt_len, dtype=torch.bool, device=raw.device)
    alive = alive.scatter(1, index, True if filled is None else filled)
    scores = span_max(scores, context.config.pool, ~alive, context.config.pool_offset)
    chosen = replace(eligibility, padding=~alive).select(scores)  # prompt indices
    local = torch.searchsorted(index, chosen.index).clamp_max(index.shape[1] - 1)
    return chosen, Selection(local, chosen.filled, chosen.kept_per_row)


def select_active(scores: torch.Tensor, lengths: list[int], halt_ratio: float,
                  protect_first: int, protect_last: int,
                  padding: torch.Tensor | None = None,
                  eligible: tuple[torch.Tensor, list[int]] | None = None) -> Selection:
    """Keep the highest-scoring tokens of every row; halt the rest.

    scores : (batch, seq) float, higher = more worth computing further. The other arguments
    are those of :meth:`Eligibility.of_prompt`; see :meth:`Eligibility.select`.
    """
    eligibility = Eligibility.of_prompt(lengths, scores.shape[1], halt_ratio, protect_first,
                                        protect_last, padding, eligible, scores.device)
    return eligibility.select(scores)

"""Halting policies: pure functions from tensors to a selection of active tokens.

A policy scores every prompt token at the start layer; ``select_active`` turns scores into
the active set. The engine never knows which policy produced the scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Selection:
    """The active set chosen at the start layer.

    Attributes
    ----------
    index : LongTensor (batch, kept)
        Original sequence indices of the active tokens, ascending in each row.
    valid : BoolTensor (batch, kept) or None
        False for filler slots (rows that keep fewer tokens than the widest row, padding).
        Filler slots are computed but never attended to. None when every slot is real.
    kept_per_row : list[int]
        Real tokens kept in each row.
    """

    index: torch.Tensor
    valid: torch.Tensor | None
    kept_per_row: list[int]


def delta_norm(update: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The DASH score Δ_t = ||U_t||₂, or ||U_t||₂ / ||h_t||₂ when ``hidden`` is given.

    update, hidden: (batch, seq, hidden_size) -> (batch, seq) float32.
    """
    norm = update.float().norm(dim=-1)
    if hidden is None:
        return norm
    return norm / hidden.float().norm(dim=-1).clamp_min(1e-6)


def received_attention(queries: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor,
                       key_positions: torch.Tensor, key_valid: torch.Tensor | None,
                       scaling: float) -> torch.Tensor:
    """Attention each key receives from the last queries, averaged over heads and queries.

    The FastV / LazyLLM / GemFilter-style baseline. Only the last queries are scored, so the
    full (seq, seq) attention matrix is never built; causal order follows original positions.

    queries : (batch, heads, n, head_dim); keys : (batch, kv_heads, seq, head_dim);
    query_positions : (batch, n); key_positions, key_valid : (batch, seq). -> (batch, seq).
    """
    groups = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", queries.float(), keys.float()) * scaling
    allowed = key_positions[:, None, None, :] <= query_positions[:, None, :, None]
    if key_valid is not None:
        allowed &= key_valid[:, None, None, :]
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1).mean(dim=(1, 2))


def random_scores(batch: int, seq_len: int, seed: int, device: torch.device) -> torch.Tensor:
    """Uniform scores from a seeded CPU generator (same draw on every device): (batch, seq)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, seq_len, generator=generator, device="cpu").to(device)


def kept_count(num_tokens: int, halt_ratio: float, num_protected: int) -> int:
    """Tokens kept in a row of ``num_tokens``: T - int(ρ·T), or more when protection forces it."""
    return min(num_tokens, max(num_tokens - int(halt_ratio * num_tokens), num_protected))


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


def select_active(scores: torch.Tensor, lengths: list[int], halt_ratio: float,
                  protect_first: int, protect_last: int,
                  padding: torch.Tensor | None = None,
                  eligible: tuple[torch.Tensor, list[int]] | None = None) -> Selection:
    """Keep the highest-scoring tokens of every row; halt the rest.

    Parameters
    ----------
    scores : (batch, seq) float
        Higher means more worth computing further.
    lengths : list[int]
        Real (non-padding) tokens per row; rows are left-padded. Padding is halted first.
    padding : (batch, seq) bool, optional
        True at padding; derived from ``lengths`` when not given.
    halt_ratio, protect_first, protect_last :
        As in :class:`DashConfig`.
    eligible : ((batch, seq) bool, list[int]), optional
        Tokens that may halt at all (image tokens) and their count per row, protected ones
        excluded; then each row halts ``int(ρ · count)`` of them and keeps everything else.

    Every row keeps ``kept_count`` of its own tokens, exactly as it would alone; rows keeping
    fewer than the widest row get filler slots marked invalid, so the batch stays rectangular.
    """
    batch, seq_len = scores.shape
    device = scores.device
    padded = min(lengths) < seq_len
    if padded and padding is None:
        padding = torch.arange(seq_len, device=device)[None, :] < torch.tensor(
            [seq_len - n for n in lengths], device=device)[:, None]
    padding = padding if padded else None
    protect = protected_mask(padding, batch, seq_len, protect_first, protect_last, device)
    if eligible is None:
        num_protected = [min(n, protect_first + max(protect_last, 1)) for n in lengths]
        kept = [kept_count(n, halt_ratio, p) for n, p in zip(lengths, num_protected)]
    else:
        protect = protect | ~eligible[0].to(device)
        kept = [n - int(halt_ratio * e) for n, e in zip(lengths, eligible[1])]
    width = max(kept)
    if width == seq_len and not padded:
        # Nothing halts: the identity selection needs no ranking.
        index = torch.arange(seq_len, device=device).expand(batch, seq_len)
        return Selection(index=index, valid=None, kept_per_row=kept)
    ranked = scores.float().masked_fill(protect, float("inf"))
    if padded:
        ranked = ranked.masked_fill(padding, float("-inf"))
    index, order = ranked.topk(width, dim=-1, sorted=True).indices.sort(dim=-1)
    if min(kept) == width:
        return Selection(index=index, valid=None, kept_per_row=kept)
    # Rows keeping fewer tokens than the widest one: slots ranked past their count are filler.
    real = torch.arange(width, device=device)[None, :] < torch.tensor(kept, device=device)[:, None]
    return Selection(index=index, valid=real.gather(1, order), kept_per_row=kept)

"""What each gate does to one engine step, decided on the host before the forward runs.

vLLM schedules a batch of requests per step: some prefill their whole prompt (chunked prefill
and prefix caching are off, so a prompt arrives whole), others decode. A gate keeps
``kept_tokens(T, ρ)`` of a prefilling request's T prompt tokens: the count depends on T and the
setting only, so the layers after a gate get their own attention metadata here, in the
metadata builder, before the model picks WHICH tokens survive. Later layers cache a request's
survivors at logical slots 0..k-1 of its blocks and its generated tokens from slot k on; a
device table keyed by the request's first block remembers T - k for its decoding steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dash_prefill.core.config import DashConfig
from dash_prefill.core.policy import host_to_device, prompt_kept


def kept_tokens(num_tokens: int, halt_ratio: float, config: DashConfig) -> int:
    """Tokens a prompt of ``num_tokens`` keeps past a gate halting ``halt_ratio`` of it under
    ``config``'s protection (``core.policy.prompt_kept``, as the HF path's ``Eligibility``)."""
    return prompt_kept(num_tokens, halt_ratio, config.protect_first, config.protect_last)


@dataclass(frozen=True)
class GatePlan:
    """One gate on one step's batch; host lists with one entry per request, in batch order.

    entering : tokens of each request entering the gate (the prompt, or the previous gate's survivors)
    leaving : tokens of each request computed after the gate
    prompt : T of a request prefilling its prompt this step, 0 for one that decodes
    """

    entering: list[int]
    leaving: list[int]
    prompt: list[int]

    @property
    def halts(self) -> bool:
        return self.entering != self.leaving


def step_plans(query_lens: list[int], prompt: list[int], config: DashConfig,
               ratios: list[float], max_prompt_tokens: int | None = None) -> list[GatePlan]:
    """The plan of every gate (``ratios``: each gate's halt ratio, the start layer's first) for a
    step whose requests run ``query_lens`` tokens; ``prompt[r]`` is T for a request prefilling
    its whole prompt, 0 otherwise. A prompt longer than ``max_prompt_tokens`` (the recommended
    setting's bound) halts nothing: plain prefill."""
    plans, entering = [], list(query_lens)
    halting = [t if max_prompt_tokens is None or t <= max_prompt_tokens else 0 for t in prompt]
    for ratio in ratios:
        leaving = [kept_tokens(t, ratio, config) if t else n for n, t in zip(entering, halting)]
        plans.append(GatePlan(entering, leaving, list(prompt)))
        entering = leaving
    return plans


def prompt_rows(query_start_loc_cpu: torch.Tensor, seq_lens_cpu: torch.Tensor) -> tuple[list[int], list[int]]:
    """(query lengths, prompt lengths) of a step's requests: a request whose query is its whole
    sequence prefills its prompt (T = its query length); any other decodes (0)."""
    query_lens = (query_start_loc_cpu[1:] - query_start_loc_cpu[:-1]).tolist()
    seq_lens = seq_lens_cpu.tolist()
    return query_lens, [n if n == s else 0 for n, s in zip(query_lens, seq_lens)]


class HaltedOffsets:
    """T - k for every request past one gate, in a device table indexed by the request's first
    KV block (owned by the request for its whole life while prefix caching is off; a request
    always starts with a whole-prompt prefill, which writes its entry)."""

    def __init__(self):
        self.table: torch.Tensor | None = None

    def update(self, first_blocks: torch.Tensor, plan: GatePlan, num_blocks: int, at_gate: bool) -> torch.Tensor:
        """Record this step's prefilling requests; -> (num_reqs,) each request's offset between
        its tokens and the logical slots of this layer's cache. At the gate layer itself
        (``at_gate``) a prefilling request still caches every token entering the gate (its
        attention scores them all); the model moves the survivors down after choosing them."""
        device = first_blocks.device
        if self.table is None or self.table.device != device or self.table.numel() < num_blocks:
            self.table = torch.zeros(num_blocks, dtype=torch.long, device=device)
        rows = [r for r, t in enumerate(plan.prompt) if t]
        if not rows:
            return self.table[first_blocks]
        rows_tensor = host_to_device(rows, device)  # pinned and non-blocking: no host sync
        self.table[first_blocks[rows_tensor]] = host_to_device([plan.prompt[r] - plan.leaving[r] for r in rows], device)
        offsets = self.table[first_blocks]
        if at_gate:
            offsets[rows_tensor] = host_to_device([plan.prompt[r] - plan.entering[r] for r in rows], device)
        return offsets


def layer_metadata(common, counts: list[int], prompt: list[int], offsets: torch.Tensor, block_size: int):
    """The CommonAttentionMetadata of a layer at or after a gate: each request's query holds the
    ``counts`` tokens it computes there, its keys are ``seq_len - offset`` and new keys go to
    logical slots ``seq_len - offset - count ...`` of its blocks.

    common : vLLM's CommonAttentionMetadata of the step; prompt : T of each prefilling request, 0
    for a decoding one; offsets : (num_reqs,) from ``HaltedOffsets.update``.
    Returns (metadata, slot_mapping) with slot_mapping (tokens in this layer,) int64.
    """
    device = common.seq_lens.device
    starts_cpu = torch.zeros(len(counts) + 1, dtype=torch.int32)
    starts_cpu[1:] = torch.tensor(counts, dtype=torch.int32).cumsum(0)
    num_tokens = int(starts_cpu[-1])
    starts = host_to_device(starts_cpu.tolist(), device).int()  # pinned and non-blocking: no host sync
    seq_lens = common.seq_lens - offsets.to(common.seq_lens.dtype)
    row = torch.repeat_interleave(torch.arange(len(counts), device=device), starts.diff(), output_size=num_tokens)
    logical = (seq_lens[row] - (starts[row + 1] - starts[row]) +
               torch.arange(num_tokens, device=device) - starts[row]).long()
    slots = logical_slots(common.block_table_tensor[row], logical, block_size)
    changes = dict(query_start_loc=starts, query_start_loc_cpu=starts_cpu, seq_lens=seq_lens,
                   num_actual_tokens=num_tokens, max_query_len=max(counts, default=0), slot_mapping=slots)
    upper = getattr(common, "seq_lens_cpu_upper_bound", None)
    if upper is not None:  # exact for prefilling requests, an upper bound for the others
        changes["seq_lens_cpu_upper_bound"] = torch.tensor(
            [n if t else int(u) for n, t, u in zip(counts, prompt, upper.tolist())], dtype=upper.dtype)
    for name in ("_seq_lens_cpu", "_num_computed_tokens_cpu", "positions"):
        if getattr(common, name, None) is not None:  # derived host copies: let vLLM recompute them
            changes[name] = None
    return common.replace(**changes), slots


def logical_slots(block_rows: torch.Tensor, logical: torch.Tensor, block_size: int) -> torch.Tensor:
    """KV-cache slots of ``logical`` indices (tokens,) in the requests whose block-table rows are
    ``block_rows`` (tokens, max_blocks)."""
    blocks = block_rows.gather(1, (logical // block_size)[:, None])[:, 0].long()
    return blocks * block_size + logical % block_size

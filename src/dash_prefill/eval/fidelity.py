"""Output fidelity of halting: each policy against plain prefill on the same prompt.

Per prompt and policy: KL(plain || policy) of the last prompt position's next-token
distributions, whether their top-1 tokens agree, and whether the first ``num_tokens`` greedy
tokens are identical (plus the length of the identical prefix). The prompts are the task
generators' prompts, drawn round-robin across tasks, built and protected exactly as in
:mod:`dash_prefill.eval.runner`. Records go to the same kind of resumable JSONL file
(``kind = "fidelity"``).
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.auto import tqdm

from dash_prefill.core.config import DashConfig
from dash_prefill.hf.generation import stop_token_ids
from dash_prefill.hf.prefill import prefill_branches
from dash_prefill.eval.runner import (
    PLAIN,
    append_records,
    cell_key,
    encode_sample,
    greedy_tokens,
    read_records,
    provenance,
    record_key,
    sample_configs,
    token_counter,
)
from dash_prefill.eval.tasks import generate_samples

logger = logging.getLogger(__name__)


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(p || q) in nats of the softmax distributions of two logit vectors (vocab,)."""
    log_p = reference_logits.double().log_softmax(-1)
    log_q = logits.double().log_softmax(-1)
    return max(float((log_p.exp() * (log_p - log_q)).sum()), 0.0)


def prompt_pool(tasks, num_prompts: int) -> list[tuple[str, int]]:
    """``num_prompts`` (task, sample index) pairs, round-robin across ``tasks``."""
    per_task = math.ceil(num_prompts / len(tasks))
    return [(task, i) for i in range(per_task) for task in tasks][:num_prompts]


def evaluate_fidelity(model, tokenizer, model_name: str, tasks, target_length: int,
                      num_prompts: int, policies: list[tuple[str, DashConfig]], results_path,
                      num_tokens: int = 16, seed: int = 42) -> list[dict]:
    """Compare every policy with plain prefill on ``num_prompts`` task prompts; resumable.

    Parameters
    ----------
    model, tokenizer, model_name, target_length, seed :
        As in :func:`dash_prefill.eval.runner.evaluate`.
    tasks : sequence of str
        Tasks whose prompts form the pool (round-robin).
    num_prompts : int
        Prompts to average over (50 or more for a stable estimate).
    policies : list of (label, DashConfig)
        Policies to compare with plain prefill ("plain" itself is allowed: a sanity check).
    results_path : path
        JSONL file shared with the task results.
    num_tokens : int
        Greedy tokens compared per prompt.

    Returns
    -------
    list of dict
        One record per (prompt, policy): ``kl``, ``top1_agree``, ``exact_match``,
        ``matched_prefix``.
    """
    if num_prompts < 1 or num_tokens < 1:
        raise ValueError(f"num_prompts and num_tokens must be >= 1; got {num_prompts}, {num_tokens}")
    pool = prompt_pool(list(tasks), num_prompts)
    done = {record_key(r): r for r in read_records(results_path)}

    def key(task, i, label, config):
        return cell_key("fidelity", model_name, target_length, task, i, label, config, seed,
                        num_tokens=num_tokens)

    stop = stop_token_ids(model, tokenizer)
    count_tokens = token_counter(tokenizer)
    samples: dict[str, list] = {}
    where = provenance(model)
    out = []
    for task, i in tqdm(pool, desc=f"fidelity {model_name} {target_length}", unit="prompt"):
        chosen = [(label, c) for label, c in policies if key(task, i, label, c) not in done]
        if chosen:
            if task not in samples:
                count = sum(1 for t, _ in pool if t == task)
                samples[task] = generate_samples(task, count_tokens, target_length, count, seed)
            records = _compare(model, tokenizer, samples[task][i], chosen, num_tokens, stop)
            for record, (label, config) in zip(records, chosen):
                record.update(model=model_name, length=target_length, seed=seed, label=label,
                              config=config.as_dict(), key_extra={"num_tokens": num_tokens},
                              **where)
                done[key(task, i, label, config)] = record
            append_records(results_path, records)
        out.extend(done[key(task, i, label, c)] for label, c in policies)
    return out


def _compare(model, tokenizer, sample, policies, num_tokens: int, stop: set[int]) -> list[dict]:
    prompt = encode_sample(tokenizer, sample)
    configs = sample_configs([("plain", PLAIN)] + list(policies), sample, prompt)
    states = prefill_branches(model, torch.tensor([prompt.ids]), configs)
    reference_logits = states[0].logits[0]
    reference = greedy_tokens(model, states[0], num_tokens, stop)
    records = []
    for state in states[1:]:
        tokens = greedy_tokens(model, state, num_tokens, stop)
        matched = next((n for n, (a, b) in enumerate(zip(reference, tokens)) if a != b),
                       min(len(reference), len(tokens)))
        records.append({
            "kind": "fidelity", "task": sample.task, "sample": sample.index,
            "kl": kl_divergence(reference_logits, state.logits[0]),
            "top1_agree": bool(reference_logits.argmax() == state.logits[0].argmax()),
            "exact_match": tokens == reference, "matched_prefix": matched,
            "prompt_tokens": state.stats.prompt_tokens[0], "kept_tokens": state.stats.kept_tokens[0],
            "ideal_speedup": state.stats.ideal_speedup,
        })
    return records

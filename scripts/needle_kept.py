"""Does a policy keep the needle? For RULER-style samples, the share of the answer's tokens
in the context that stay active at the start layer, and their score percentile.

Usage: python scripts/needle_kept.py MODEL TASK LENGTH SAMPLES POLICY [POLICY ...]
e.g.   python scripts/needle_kept.py gemma3-270m niah_single_2 8k 10 dash@0.5/d0.4 dash@0.5/d0.8

Prints one line per policy: answer tokens kept (all samples pooled), samples whose every
answer token was kept, and the median percentile of the answer tokens' scores among the
context's tokens (100 = the highest score). Same samples and configs as `dash-prefill eval`.
"""

import logging
import statistics
import sys

import torch

from dash_prefill import prefill_branches
from dash_prefill.eval.cli import _length
from dash_prefill.eval.runner import encode_sample, parse_policies, sample_configs, token_counter
from dash_prefill.eval.tasks import generate_samples, prompt_text
from dash_prefill.loading import load_model


def answer_positions(tokenizer, sample, ids: list[int]) -> list[int]:
    """Token indices of the context's occurrences of every reference string."""
    encoded = tokenizer(prompt_text(sample), return_offsets_mapping=True)
    if list(encoded["input_ids"]) != ids:
        raise SystemExit("offsets tokenization differs from the evaluated prompt (chat template?)")
    spans = []
    for ref in sample.references:
        at = sample.context.find(ref)
        while at >= 0:
            spans.append((at, at + len(ref)))
            at = sample.context.find(ref, at + 1)
    return [i for i, (a, b) in enumerate(encoded["offset_mapping"])
            if b > a and any(a < end and b > start for start, end in spans)]


def main(model_name: str, task: str, length: str, samples: str, *labels: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    model, tokenizer = load_model(model_name, device="cpu")
    policies = parse_policies(",".join(labels))
    kept = {label: [0, 0, 0, []] for label in labels}  # kept, total, whole samples, percentiles
    for sample in generate_samples(task, token_counter(tokenizer), _length(length), int(samples)):
        prompt = encode_sample(tokenizer, sample)
        positions = answer_positions(tokenizer, sample, prompt.ids)
        context_end = len(prompt.ids) - prompt.tail_tokens
        configs = sample_configs(policies, sample, prompt)
        with torch.inference_mode():
            states = prefill_branches(model, torch.tensor([prompt.ids]), configs)
        for (label, _), state in zip(policies, states):
            active = set(state.active_mask[0].nonzero()[:, 0].tolist())
            scores = state.scores[0, :context_end]
            hit = sum(p in active for p in positions)
            entry = kept[label]
            entry[0] += hit
            entry[1] += len(positions)
            entry[2] += hit == len(positions)
            entry[3] += [100.0 * (scores < scores[p]).float().mean().item() for p in positions]
    for label, (hit, total, whole, pct) in kept.items():
        print(f"{model_name} {task} {length} {label:18s} answer tokens kept {hit}/{total}  "
              f"whole answer kept in {whole}/{samples} samples  "
              f"median score percentile {statistics.median(pct):.0f}")


if __name__ == "__main__":
    if len(sys.argv) < 6:
        sys.exit(__doc__)
    main(*sys.argv[1:])

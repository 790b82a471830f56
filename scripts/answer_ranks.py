"""Where do the answer's tokens rank at the start layer? For RULER-style samples: per task and
policy, the share of the answer's tokens in the context that stay active, and the median
percentile of their scores among the context's tokens (100 = the highest), for the FIRST
token of each occurrence of a reference and for the REST of its tokens.

Usage: python scripts/answer_ranks.py MODEL LENGTH SAMPLES TASKS POLICY [POLICY ...]
       [--dtype bfloat16] [--device cuda] [--out FILE.jsonl]
e.g.   python scripts/answer_ranks.py qwen2.5-coder-1.5b 4k 5 all dash@0.5/d0.4 attention@0.5/d0.4/p15

Same samples, prompts (chat template included) and configs as `dash-prefill eval`. Prints a
markdown table; --out appends one JSON record per (task, policy).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics

import torch

from dash_prefill import prefill_branches
from dash_prefill.eval.cli import _length, _tasks
from dash_prefill.eval.runner import (_has_template, encode_sample, parse_policies, sample_configs,
                                      sample_text, token_counter)
from dash_prefill.eval.tasks import generate_samples
from dash_prefill.loading import load_model


def answer_tokens(tokenizer, sample, ids: list[int]) -> list[list[int]]:
    """Token indices of every occurrence of every reference inside the context, one list per
    occurrence (in order), from the tokenizer's offsets over the exact prompt text."""
    text = sample_text(tokenizer, sample)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=not _has_template(tokenizer))
    if list(encoded["input_ids"]) != ids:
        raise SystemExit("offsets tokenization differs from the evaluated prompt")
    start = text.find(sample.context)
    occurrences = []
    for ref in sample.references:
        at = sample.context.find(ref)
        while at >= 0:
            a, b = start + at, start + at + len(ref)
            tokens = [i for i, (x, y) in enumerate(encoded["offset_mapping"]) if y > x and x < b and y > a]
            if tokens:
                occurrences.append(tokens)
            at = sample.context.find(ref, at + 1)
    return occurrences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("length", type=_length)
    parser.add_argument("samples", type=int)
    parser.add_argument("tasks", type=_tasks)
    parser.add_argument("policies", nargs="+")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    policies = parse_policies(",".join(args.policies))
    rows = []
    for task in args.tasks:
        stats = {label: {"first": [], "rest": [], "kept_first": 0, "kept_rest": 0} for label, _ in policies}
        for sample in generate_samples(task, token_counter(tokenizer), args.length, args.samples):
            prompt = encode_sample(tokenizer, sample)
            occurrences = answer_tokens(tokenizer, sample, prompt.ids)
            if not occurrences:
                continue
            context_end = len(prompt.ids) - prompt.tail_tokens
            configs = sample_configs(policies, sample, prompt)
            ids = torch.tensor([prompt.ids], device=model.device)
            with torch.inference_mode():
                states = prefill_branches(model, ids, configs)
            for (label, _), state in zip(policies, states):
                active = state.active_mask[0].cpu()
                scores = state.scores[0, :context_end].float().cpu()
                ranked = scores.argsort().argsort().float() / max(context_end - 1, 1) * 100
                entry = stats[label]
                for tokens in occurrences:
                    for part, chosen in (("first", tokens[:1]), ("rest", tokens[1:])):
                        chosen = [t for t in chosen if t < context_end]
                        entry[part] += [ranked[t].item() for t in chosen]
                        entry[f"kept_{part}"] += sum(bool(active[t]) for t in chosen)
        for label, entry in stats.items():
            if not entry["first"]:
                continue
            row = {"model": args.model, "length": args.length, "task": task, "label": label,
                   "samples": args.samples,
                   "first_tokens": len(entry["first"]), "rest_tokens": len(entry["rest"]),
                   "first_kept": entry["kept_first"] / len(entry["first"]),
                   "rest_kept": entry["kept_rest"] / len(entry["rest"]) if entry["rest"] else None,
                   "first_percentile": statistics.median(entry["first"]),
                   "rest_percentile": statistics.median(entry["rest"]) if entry["rest"] else None}
            rows.append(row)
    if args.out:
        with open(args.out, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    print("| task | policy | first token kept | its median pct | rest kept | their median pct |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rest = "–" if r["rest_kept"] is None else f"{100 * r['rest_kept']:.0f}% ({r['rest_tokens']})"
        rest_pct = "–" if r["rest_percentile"] is None else f"{r['rest_percentile']:.0f}"
        print(f"| {r['task']} | {r['label']} | {100 * r['first_kept']:.0f}% ({r['first_tokens']}) | "
              f"{r['first_percentile']:.0f} | {rest} | {rest_pct} |")


if __name__ == "__main__":
    main()

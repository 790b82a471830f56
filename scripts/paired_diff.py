"""Paired comparison of two policies on the same samples, with a bootstrap 95% interval.

Usage: python scripts/paired_diff.py LENGTH A.jsonl LABEL_A B.jsonl LABEL_B
e.g.   python scripts/paired_diff.py 8192 results/eval/gemma3-270m/results.jsonl dash@0.5 \
           results/eval/gemma3-270m/results.jsonl random@0.5

Prints the samples both hold, how many A scores higher / lower than B, the mean score
difference A - B (RULER points) and its 95% interval from 10,000 bootstrap resamples of samples.
"""

import random
import sys

from dash_prefill.eval.runner import read_records


def scores(path: str, label: str, length: int) -> dict:
    return {(r["task"], r["sample"]): r["score"] for r in read_records(path)
            if r.get("kind") == "task" and r["length"] == length and r["label"] == label}


def main(length: str, path_a: str, label_a: str, path_b: str, label_b: str) -> None:
    a, b = scores(path_a, label_a, int(length)), scores(path_b, label_b, int(length))
    cells = sorted(set(a) & set(b))
    if not cells:
        sys.exit(f"no sample holds both {label_a} and {label_b} at length {length}")
    diffs = [a[c] - b[c] for c in cells]
    rng = random.Random(0)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(10_000))
    print(f"{label_a} - {label_b} at {length}: {len(cells)} samples, "
          f"{sum(d > 0 for d in diffs)} higher, {sum(d < 0 for d in diffs)} lower, "
          f"mean {sum(diffs) / len(diffs):+.1f} points, 95% interval "
          f"[{means[250]:+.1f}, {means[9750]:+.1f}]")


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    main(*sys.argv[1:])

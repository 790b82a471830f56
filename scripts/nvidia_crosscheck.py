"""Cross-check the project's RULER re-implementation against NVIDIA's own generators (issue 29).

NVIDIA's generators ship in ``nvidia-long-context-eval`` (``long_context_eval/data/prepare.py``
with ``synthetic.yaml`` and ``data/synthetic/{niah,variable_tracking}.py``). This script

1. runs ``prepare.py`` as shipped (``--tokenizer_type hf`` with the evaluated model's tokenizer,
   ``--model_template_type base``, seed 42) for each task; the generators import nltk's
   ``sent_tokenize`` and tenacity at module level, so ``--extra-path`` (a ``pip install --target``
   folder holding nltk and tenacity) is put on their PYTHONPATH. The repeat/needle haystacks of
   niah_single_1, niah_multikey_2, niah_multikey_3 and vt never call the sentence splitter, so no
   nltk data (punkt) is needed; the essay tasks would need it and are not run here.
2. splits each NVIDIA prompt (``template + answer_prefix``) into the project's
   ``Sample(context, question, answer_prefix)`` and runs it through the project's own
   :func:`dash_prefill.eval.runner.run_sample`: the same chat template, protected tail, shared
   trunk (``prefill_branches``), greedy decoding and RULER string-match scoring as
   ``dash-prefill eval``. Policies: plain and the shipped profile (``recommended_config``), as
   ``parse_policies("plain,calibrated")`` builds them for the eval.
3. writes every record to ``OUT/nvidia/results.jsonl`` (resumable; the same record format as the
   eval, plus ``generator``), and a table ``OUT/table.md`` comparing with the project's own
   samples in ``OUT/project/results.jsonl`` (from ``dash-prefill eval``): per task and generator,
   plain, profile, and profile - plain with the paired 95% bootstrap interval of
   ``scripts/paired_diff.py``.

Length: NVIDIA fits ``len(tokenize(raw prompt)) + tokens_to_generate <= max_seq_length`` on the
raw text, the project fits the chat-templated prompt. ``--max-seq-length`` defaults to the target
length minus the tokens the chat template adds, so both generators' templated prompts fit the same
budget.

Usage:
  OMP_NUM_THREADS=1 python scripts/nvidia_crosscheck.py --tasks niah_single_1,niah_multikey_2,vt \
      --samples 20 --length 4096 --dtype float32 --extra-path /tmp/nltk_site \
      --out results/eval/nvidia-crosscheck
  python scripts/nvidia_crosscheck.py --report-only --out results/eval/nvidia-crosscheck ...
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import fmean

import torch

import dash_prefill as dp
from dash_prefill.eval.runner import (append_records, parse_policies, provenance, read_records,
                                      run_sample, stop_token_ids, token_counter)
from dash_prefill.eval.tasks import MAX_NEW_TOKENS, METRICS, Sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paired_diff  # noqa: E402  (scripts/paired_diff.py: the project's paired bootstrap)

import long_context_eval  # noqa: E402
from long_context_eval.data.synthetic.constants import TASKS as NV_TASKS  # noqa: E402

NV_ROOT = Path(long_context_eval.__file__).parent
PREPARE = NV_ROOT / "data" / "prepare.py"
# Where the question starts and the answer prefix starts in each NVIDIA task family's prompt.
SPLITS = {
    "niah": ("\nWhat ", "?"),  # question up to its '?', then " The special magic ..."
    "variable_tracking": ("\nQuestion: Find all variables", " Answer: According to the chain"),
}
NV_FAMILY = {"niah_single_1": "niah", "niah_multikey_2": "niah", "niah_multikey_3": "niah",
             "vt": "variable_tracking"}


def generate(task: str, tokenizer_path: str, max_seq_length: int, samples: int, data_dir: Path,
             extra_path: str | None) -> list[dict]:
    """Run NVIDIA's prepare.py for one task; returns its JSONL rows (index, input, outputs, length)."""
    out = data_dir / task / "validation.jsonl"
    if not out.exists():
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # prepare.py runs `python`
        if extra_path:
            env["PYTHONPATH"] = extra_path + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        command = [sys.executable, str(PREPARE), "--save_dir", str(data_dir), "--benchmark", "synthetic",
                   "--task", task, "--tokenizer_path", tokenizer_path, "--tokenizer_type", "hf",
                   "--max_seq_length", str(max_seq_length), "--model_template_type", "base",
                   "--num_samples", str(samples)]
        print("$", " ".join(command), flush=True)
        done = subprocess.run(command, env=env, cwd=data_dir, capture_output=True, text=True)
        print(done.stdout[-2000:], done.stderr[-2000:], flush=True)
        if not out.exists():  # prepare.py reports a failing generator but exits 0
            sys.exit(f"NVIDIA's generator wrote nothing for {task}")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if len(rows) < samples:
        sys.exit(f"{out} holds {len(rows)} samples, fewer than {samples}: delete it to regenerate")
    return rows[:samples]


def to_sample(task: str, row: dict) -> Sample:
    """An NVIDIA row as the project's Sample: context | question | answer prefix."""
    text = row["input"]
    q_mark, a_mark = SPLITS[NV_FAMILY[task]]
    q_at = text.rindex(q_mark)
    a_at = text.index("?", q_at) + 1 if a_mark == "?" else text.rindex(a_mark)
    sample = Sample(task, int(row["index"]), text[:q_at], text[q_at:a_at], text[a_at:],
                    tuple(row["outputs"]), MAX_NEW_TOKENS[task], METRICS[task])
    assert sample.context + sample.question + sample.answer_prefix == text
    return sample


def run(args) -> None:
    torch.set_num_threads(1)
    model, tokenizer = dp.load_model(args.model, dtype=args.dtype, device="cpu")
    policies = parse_policies("plain,calibrated", calibrated=dp.recommended_config(model))
    print("policies:", [label for label, _ in policies], flush=True)
    count = token_counter(tokenizer)
    overhead = count("x") - len(tokenizer.tokenize("x"))  # tokens the chat template adds
    max_seq = args.max_seq_length or args.length - overhead
    print(f"chat template adds {overhead} tokens; NVIDIA --max_seq_length {max_seq}", flush=True)
    out = Path(args.out)
    data_dir = (out / "nvidia-data").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    results = out / "nvidia" / "results.jsonl"
    done = {(r["task"], r["sample"], r["label"]) for r in read_records(results)}
    stop = stop_token_ids(model, tokenizer)
    where = provenance(model)
    for task in args.tasks.split(","):
        nv_task = NV_FAMILY[task]
        assert NV_TASKS[nv_task]["tokens_to_generate"] == MAX_NEW_TOKENS[task], task
        rows = generate(task, tokenizer.name_or_path, max_seq, args.samples, data_dir, args.extra_path)
        for row in rows:
            sample = to_sample(task, row)
            chosen = [(label, c) for label, c in policies if (task, sample.index, label) not in done]
            if not chosen:
                continue
            t0 = time.perf_counter()
            records = run_sample(model, tokenizer, sample, chosen, stop)
            for record, (label, config) in zip(records, chosen):
                record.update(model=args.model, length=args.length, seed=42, label=label,
                              config=config.as_dict(), generator="nvidia",
                              nvidia_max_seq_length=max_seq, nvidia_length=row["length"], **where)
            append_records(results, records)
            print(f"{task}[{sample.index}] {time.perf_counter() - t0:.0f}s "
                  + " ".join(f"{r['label']}={r['score']:.0f}" for r in records)
                  + f" tokens={records[0]['prompt_tokens']}", flush=True)


def paired(records: list[dict], length: int, label_a: str, label_b: str) -> str:
    """scripts/paired_diff.py's line for label_a - label_b on these records."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            paired_diff.main(str(length), handle.name, label_a, handle.name, label_b)
    finally:
        os.unlink(handle.name)
    return buffer.getvalue().strip()


def unpaired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b) of two independent sample sets and its 95% bootstrap interval
    (10,000 resamples of each set, seed 0, as scripts/paired_diff.py draws its own)."""
    rng = random.Random(0)
    means = sorted(fmean(rng.choices(a, k=len(a))) - fmean(rng.choices(b, k=len(b)))
                   for _ in range(10_000))
    return fmean(a) - fmean(b), means[250], means[9750]


def report(args) -> None:
    out = Path(args.out)
    sources = {"project": out / "project" / "results.jsonl", "nvidia": out / "nvidia" / "results.jsonl"}
    lines = ["| task | generator | n | prompt tokens (mean) | plain | profile | profile − plain [95%] "
             "| higher / lower |", "|---|---|---:|---:|---:|---:|---|---|"]
    cells_of = {}
    profile = None
    for task in args.tasks.split(","):
        for generator, path in sources.items():
            records = [r for r in read_records(path) if r.get("kind") == "task"
                       and r["task"] == task and r["length"] == args.length and r["sample"] < args.samples]
            labels = sorted({r["label"] for r in records} - {"plain"})
            if not records or not labels:
                continue
            profile = labels[0]
            by = {label: {r["sample"]: r for r in records if r["label"] == label} for label in ("plain", profile)}
            cells = sorted(set(by["plain"]) & set(by[profile]))
            if not cells:
                continue
            plain = [by["plain"][i]["score"] for i in cells]
            prof = [by[profile][i]["score"] for i in cells]
            cells_of[task, generator] = (plain, [p - q for p, q in zip(prof, plain)])
            tokens = fmean(by["plain"][i]["prompt_tokens"] for i in cells)
            line = paired([r for r in records if r["sample"] in cells], args.length, profile, "plain")
            # "... N samples, H higher, L lower, mean +x points, 95% interval [a, b]"
            counts = line.split(": ", 1)[1].split(", mean")[0]
            diff = line.split("mean ", 1)[1].replace(" points, 95% interval", "")
            higher_lower = ", ".join(counts.split(", ")[1:])
            lines.append(f"| {task} | {generator} | {len(cells)} | {tokens:.0f} | {fmean(plain):.1f} "
                         f"| {fmean(prof):.1f} | {diff} | {higher_lower} |")
            print(line, f"({task}, {generator})")
    lines += ["", f"profile = {profile}. Between generators (independent samples, 95% bootstrap "
              "interval; the generators agree where the interval of the effects' difference holds 0):",
              "", "| task | plain: nvidia − project | (profile − plain): nvidia − project | agree |",
              "|---|---|---|---|"]
    for task in args.tasks.split(","):
        if (task, "project") in cells_of and (task, "nvidia") in cells_of:
            (p_plain, p_diff), (n_plain, n_diff) = cells_of[task, "project"], cells_of[task, "nvidia"]
            level, effect = unpaired(n_plain, p_plain), unpaired(n_diff, p_diff)
            agree = effect[1] <= 0 <= effect[2]
            fmt = "{:+.1f} [{:+.1f}, {:+.1f}]".format
            lines.append(f"| {task} | {fmt(*level)} | {fmt(*effect)} | {'yes' if agree else 'NO'} |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="niah_single_1,niah_multikey_2,vt")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="NVIDIA's --max_seq_length (default: length minus the chat template's tokens)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--extra-path", default=None,
                        help="a folder with nltk and tenacity (pip install --target) for NVIDIA's scripts")
    parser.add_argument("--out", default="results/eval/nvidia-crosscheck")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        run(args)
    report(args)


if __name__ == "__main__":
    main()

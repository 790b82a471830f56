"""Evaluation report: Markdown tables and plots (matplotlib Agg) from a results JSONL file.

Means over tasks are means of per-task means. "vs plain" compares a policy with plain prefill
on exactly the cells (task, sample) both have, so a policy run on a subset of the tasks (the
start-layer sweep) is compared fairly: it is the policy's mean score over those cells divided by
plain's (a ratio of sample means, which equals the ratio of per-task means when every task has
the same number of cells). Its "mean" column is over its own tasks only.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from statistics import fmean

from dash_prefill.eval.runner import read_records

logger = logging.getLogger(__name__)


def _order(row: dict):
    config = row["config"]
    return (config["policy"] != "none", config["policy"], config["score"],
            str(config["start_layer"]), config["halt_ratio"], row["label"])


def _groups(records, kind):
    groups = defaultdict(list)
    for record in records:
        if record.get("kind") == kind:
            groups[record["model"], record["length"], record["label"]].append(record)
    return groups


def summarize(records: list[dict]) -> list[dict]:
    """One row per (model, length, policy label) of the task records.

    Returns
    -------
    list of dict
        ``model, length, label, config, tasks`` (task -> mean score), ``mean``, ``samples``,
        ``vs_plain`` (% of plain's score on the same cells, None without plain),
        ``kept`` (mean kept fraction of the prompt), ``ideal_speedup``.
    """
    groups = _groups(records, "task")
    rows = []
    for (model, length, label), group in groups.items():
        by_task = defaultdict(list)
        for record in group:
            by_task[record["task"]].append(record["score"])
        plain = {(r["task"], r["sample"]): r["score"]
                 for r in groups.get((model, length, "plain"), [])}
        matched = [(r["score"], plain[r["task"], r["sample"]]) for r in group
                   if (r["task"], r["sample"]) in plain]
        plain_mean = fmean(p for _, p in matched) if matched else 0.0
        rows.append({
            "model": model, "length": length, "label": label, "config": group[0]["config"],
            "tasks": {task: fmean(scores) for task, scores in by_task.items()},
            "mean": fmean(fmean(scores) for scores in by_task.values()), "samples": len(group),
            "vs_plain": 100.0 * fmean(s for s, _ in matched) / plain_mean if plain_mean > 0 else None,
            "kept": fmean(r["kept_tokens"] / r["prompt_tokens"] for r in group),
            "ideal_speedup": fmean(r["ideal_speedup"] for r in group),
        })
    return sorted(rows, key=lambda row: (row["model"], row["length"], _order(row)))


def summarize_fidelity(records: list[dict]) -> list[dict]:
    """One row per (model, length, label) of the fidelity records: mean KL, top-1 agreement %,
    exact match % of the first N greedy tokens, mean identical prefix, prompts."""
    rows = []
    for (model, length, label), group in _groups(records, "fidelity").items():
        rows.append({
            "model": model, "length": length, "label": label, "config": group[0]["config"],
            "prompts": len(group), "kl": fmean(r["kl"] for r in group),
            "top1": 100.0 * fmean(r["top1_agree"] for r in group),
            "exact": 100.0 * fmean(r["exact_match"] for r in group),
            "matched_prefix": fmean(r["matched_prefix"] for r in group),
            "num_tokens": group[0].get("key_extra", {}).get("num_tokens"),
        })
    return sorted(rows, key=lambda row: (row["model"], row["length"], _order(row)))


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def markdown(records: list[dict], plots: list[str] = ()) -> str:
    """The report text: per (model, length) a per-task score table, then the fidelity table."""
    lines = ["# DASH evaluation", "",
             "Scores are RULER scores (0-100), greedy decoding; the question and answer prefix are "
             "never halted. *vs plain*: the policy's score as % of plain prefill's on the same "
             "samples. *kept*: prompt tokens kept at the start layer. *ideal*: FLOPs speedup "
             "of the cost model.", ""]
    rows = summarize(records)
    for model, length in sorted({(r["model"], r["length"]) for r in rows}):
        block = [r for r in rows if (r["model"], r["length"]) == (model, length)]
        tasks = sorted({t for r in block for t in r["tasks"]})
        lines += [f"## {model}, {length} tokens", "",
                  "| policy | " + " | ".join(tasks) + " | mean | vs plain % | kept % | ideal | n |",
                  "|---|" + "---:|" * (len(tasks) + 5)]
        for r in block:
            cells = [_pct(r["tasks"].get(t)) for t in tasks]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | **{r['mean']:.1f}** | "
                         f"{_pct(r['vs_plain'])} | {100 * r['kept']:.0f} | "
                         f"{r['ideal_speedup']:.2f}x | {r['samples']} |")
        dash = [r for r in block if r["config"]["policy"] == "dash" and r["vs_plain"] is not None]
        if dash:
            lines += ["", "DASH keeps " + ", ".join(
                f"{r['vs_plain']:.1f}% ({r['label']})" for r in dash) + " of plain's mean score."]
        lines.append("")
    fidelity = summarize_fidelity(records)
    if fidelity:
        lines += ["## Fidelity against plain prefill", "",
                  "| model | length | policy | prompts | KL(plain‖policy) | top-1 agree % | "
                  "first-N exact % | identical prefix (N) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
        for r in fidelity:
            lines.append(f"| {r['model']} | {r['length']} | {r['label']} | {r['prompts']} | "
                         f"{r['kl']:.4f} | {r['top1']:.1f} | {r['exact']:.1f} | "
                         f"{r['matched_prefix']:.1f} ({r['num_tokens']}) |")
        lines.append("")
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def _family(row: dict) -> str:
    config = row["config"]
    name = config["policy"] + ("-rel" if config["score"] == "relative" else "")
    return f"{name} (start {config['start_layer']})"


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """Accuracy vs halt ratio per policy family, and accuracy vs ideal speedup with the
    Pareto front, one pair of PNGs per (model, length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for model, length in sorted({(r["model"], r["length"]) for r in rows}):
        block = [r for r in rows if (r["model"], r["length"]) == (model, length)]
        plain = next((r for r in block if r["label"] == "plain"), None)
        most = max(len(r["tasks"]) for r in block)
        tag = f"{model}_{length}".replace("/", "-")

        fig, ax = plt.subplots(figsize=(6, 4))
        families = defaultdict(list)
        for r in block:
            if r["config"]["policy"] != "none":
                families[_family(r)].append(r)
        for family, members in sorted(families.items()):
            members.sort(key=lambda r: r["config"]["halt_ratio"])
            few = min(len(r["tasks"]) for r in members)
            suffix = f" [{few} tasks]" if few < most else ""
            xs = [r["config"]["halt_ratio"] for r in members]
            ys = [r["mean"] for r in members]
            if plain is not None and not suffix:  # plain prefill is every family's rho = 0
                xs, ys = [0.0] + xs, [plain["mean"]] + ys
            ax.plot(xs, ys, marker="o", label=family + suffix)
        if plain is not None:
            ax.axhline(plain["mean"], color="black", linestyle="--", label="plain")
        ax.set(xlabel="halt ratio ρ", ylabel="mean score", xlim=(-0.02, 1.0),
               title=f"{model}, {length} tokens")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / f"accuracy_vs_ratio_{tag}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4))
        points = sorted(block, key=lambda r: (r["ideal_speedup"], r["mean"]))
        for r in points:
            ax.scatter(r["ideal_speedup"], r["mean"], s=18)
            ax.annotate(r["label"], (r["ideal_speedup"], r["mean"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        front, best = [], float("-inf")
        for r in reversed(points):  # fastest first: keep a point if it beats every faster one
            if r["mean"] > best:
                front.append(r)
                best = r["mean"]
        front.reverse()
        ax.step([r["ideal_speedup"] for r in front], [r["mean"] for r in front], where="pre",
                color="grey", label="Pareto front")
        ax.set(xlabel="ideal speedup (FLOPs)", ylabel="mean score", title=f"{model}, {length} tokens")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out_dir / f"accuracy_vs_speedup_{tag}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(results_path, out_dir) -> Path:
    """Write ``report.md`` and the PNGs into ``out_dir``; returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_records(results_path)
    if not records:
        raise ValueError(f"no results in {results_path}; run the evaluation first")
    rows = summarize(records)
    plots = plot(rows, out_dir) if rows else []
    path = out_dir / "report.md"
    path.write_text(markdown(records, [str(p) for p in plots]))
    logger.info("wrote %s and %d plots", path, len(plots))
    return path


def text_table(records: list[dict]) -> str:
    """A short terminal table: mean score, vs plain, kept and ideal speedup per policy."""
    lines = [f"{'model':<14} {'length':>6} {'policy':<18} {'mean':>6} {'vs plain':>9} "
             f"{'kept':>5} {'ideal':>6} {'n':>4}"]
    for r in summarize(records):
        vs = "–" if r["vs_plain"] is None else f"{r['vs_plain']:.1f}%"
        lines.append(f"{r['model'][:14]:<14} {r['length']:>6} {r['label'][:18]:<18} {r['mean']:>6.1f} "
                     f"{vs:>9} {100 * r['kept']:>4.0f}% {r['ideal_speedup']:>5.2f}x {r['samples']:>4}")
    for r in summarize_fidelity(records):
        lines.append(f"fidelity {r['label']:<18} KL {r['kl']:.4f}  top-1 {r['top1']:.1f}%  "
                     f"exact {r['exact']:.1f}% ({r['prompts']} prompts)")
    return "\n".join(lines)

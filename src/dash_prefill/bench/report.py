"""Benchmark output: a terminal table, a JSON file (header + one record per row), a PNG plot."""

from __future__ import annotations

import datetime
import json
import logging
import platform
import shlex
import sys
from pathlib import Path

import torch
import transformers

logger = logging.getLogger(__name__)

COLUMNS = [("arch", "arch", "{}"), ("batch", "batch", "{}"), ("length", "length", "{}"),
           ("image_tokens", "img", "{}"),
           ("method", "method", "{}"), ("halt_ratio", "ρ", "{:.2f}"), ("start_layer", "start", "{}"),
           ("median_s", "median s", "{:.4f}"), ("min_s", "min s", "{:.4f}"), ("max_s", "max s", "{:.4f}"),
           ("peak_bytes", "peak GiB", "gib"), ("kv_cache_bytes", "KV GiB", "gib"),
           ("speedup", "speedup", "{:.2f}x"), ("ideal_speedup", "ideal", "{:.2f}x"),
           ("decoder_ideal_speedup", "decoder ideal", "{:.2f}x"),
           ("efficiency", "eff.", "{:.0%}"), ("speedup_over_hooks", "vs hooks", "{:.2f}x")]

# The end-to-end table (--new-tokens): TTFT, decode ms per token, total, and the bandwidth floor.
E2E_COLUMNS = [("arch", "arch", "{}"), ("length", "length", "{}"), ("new_tokens", "N", "{}"),
               ("method", "method", "{}"), ("halt_ratio", "ρ", "{:.2f}"), ("start_layer", "start", "{}"),
               ("status", "status", "{}"), ("ttft_s", "TTFT s", "{:.4f}"),
               ("decode_ms_per_token", "decode ms/tok", "{:.2f}"),
               ("floor_ms_per_token", "floor ms/tok", "{:.3f}"), ("total_s", "total s", "{:.4f}"),
               ("generated_tokens", "tokens", "{}"), ("tokens_sha1", "ids sha1", "{}")]


def header(device: torch.device, argv: list[str] | None = None, **settings) -> dict:
    """The JSON header record: machine, library versions, exact command line, date, settings."""
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    argv = sys.argv if argv is None else argv
    return {"record": "header", "machine": machine, "device": str(device), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "command": shlex.join(argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **settings}


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if key == "median_s" and row.get("status") != "ok":
        return row.get("status", "")
    if value is None:
        return "-"
    if fmt == "gib":
        return f"{value / 2**30:.2f}"
    return fmt.format(value)


def columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """COLUMNS without those no row has a value for (image tokens of text models, ...);
    E2E_COLUMNS, all of them, for end-to-end rows."""
    if any("new_tokens" in row for row in rows):
        return E2E_COLUMNS
    return [c for c in COLUMNS if c[0] in ("median_s", "arch", "method")
            or any(row.get(c[0]) is not None for row in rows)]


def table_lines(rows: list[dict]) -> list[str]:
    """The rows as aligned plain-text lines (header first)."""
    shown = columns(rows)
    cells = [[title for _, title, _ in shown]]
    cells += [[_cell(row, key, fmt) for key, _, fmt in shown] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(shown))]
    return ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]


def write_json(path: Path, head: dict, rows: list[dict], syncs: list[dict] = ()) -> None:
    """Header record, then one record per row, then the sync-check records."""
    path.write_text(json.dumps([head, *rows, *syncs], indent=1) + "\n")


def write_plot(path: Path, rows: list[dict]) -> bool:
    """Measured speedup vs context length per setting, the ideal dashed; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written (pip install matplotlib)")
        return False
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["method"] != "plain" and row["speedup"] is not None:
            key = (row["arch"], row["batch"], row["method"], row["start_layer"], row["halt_ratio"])
            series.setdefault(key, []).append(row)
    figure, axes = plt.subplots(figsize=(8, 5))
    for (arch, batch, method, start, ratio), points in sorted(series.items()):
        points.sort(key=lambda r: r["length"])
        lengths = [r["length"] for r in points]
        label = f"{arch} b={batch} {method} s={start} ρ={ratio}"
        line, = axes.plot(lengths, [r["speedup"] for r in points], marker="o", label=label)
        if method != "hooks" and ratio > 0:
            axes.plot(lengths, [r["ideal_speedup"] for r in points], linestyle="--", marker="x",
                      color=line.get_color())
    # The marks explained in the legend: with one length there are no lines, only marks.
    axes.plot([], [], "ko-", label="measured (o)")
    axes.plot([], [], "kx--", label="ideal FLOP ratio (x)")
    axes.axhline(1.0, color="grey", linewidth=0.8, label="plain HF forward (1x)")
    axes.set_xscale("log", base=2)
    measured = sorted({row["length"] for points in series.values() for row in points})
    axes.set_xticks(measured, [str(n) for n in measured])
    axes.set_xlabel("context length (tokens)")
    axes.set_ylabel("speedup over plain HF forward (time to first token)")
    axes.set_title("DASH prefill: measured (o, solid) vs ideal FLOP ratio (x, dashed)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def markdown(paths: list[Path]) -> str:
    """Markdown tables of saved ``bench.json`` files, each headed by its machine and command."""
    parts = []
    for path in paths:
        records = json.loads(Path(path).read_text())
        head = records[0]
        rows = [r for r in records if r.get("record") == "row"]
        syncs = [r for r in records if r.get("record") == "sync_check"]
        gpus = head.get("gpus", 1)
        machine = f"{gpus} × {head['machine']}" if gpus > 1 else head["machine"]
        command = "dash-prefill " + head["command"].partition(" ")[2]
        parts.append(f"**{machine}**, torch {head['torch']}, transformers {head['transformers']}, "
                     f"{head['dtype']}, {head['attn']}, {head['date'][:10]} — `{command}`\n")
        shown = columns(rows)
        parts.append("| " + " | ".join(title for _, title, _ in shown) + " |")
        parts.append("|" + "---|" * len(shown))
        parts += ["| " + " | ".join(_cell(r, key, fmt) for key, _, fmt in shown) + " |" for r in rows]
        if syncs:
            parts.append("\nHost synchronisations of one call: " + ", ".join(
                f"{s['method']} ρ={s['halt_ratio']} (T={s['length']}): {s['sync_warnings']}" for s in syncs))
        parts.append(f"\nSource: `{path}`\n")
    return "\n".join(parts)


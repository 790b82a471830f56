"""``dash-prefill eval``: task accuracy and fidelity of halting policies, then a report.

Wire-up: ``add_arguments(subparser)`` adds the options, ``main(args)`` runs and prints a table.
Everything lands in ``--out``: ``results.jsonl`` (resumable), ``report.md`` and the PNGs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from dash_prefill.core.config import DashConfig
from dash_prefill.eval.report import text_table, write_report
from dash_prefill.eval.runner import evaluate, parse_policies, read_records
from dash_prefill.eval.tasks import OFFLINE_TASKS, TASKS
from dash_prefill.bench.cli import parse_lengths
from dash_prefill.cli import add_threads_option, count_arg, start_layer_arg

logger = logging.getLogger(__name__)

QUICK_TASKS = ("niah_single_1", "vt", "fwe")
MAIN_GRID = ("plain,dash@0.25,dash@0.5,dash@0.75,random@0.25,random@0.5,random@0.75,"
             "dash-rel@0.5,attention@0.5")
GEMMA_GRID = "plain,dash@0.5,dash@0.75,random@0.5,random@0.75"


@dataclass(frozen=True)
class Run:
    """One evaluation grid: a model at one length, tasks x samples x policies."""

    model: str
    length: int
    tasks: tuple[str, ...]
    samples: int
    policies: str
    start_layer: int | float | None = None  # of labels that name none; None: the model's recommended


# Measured durations, shown in --help and before a preset starts (EVAL.md).
PRESET_DURATIONS = {"quick": "about 16 minutes on a quiet 2-core CPU",
                    "full-smollm2": "hours on a CPU", "full-gemma": "hours on a CPU; minutes on a GPU"}
PRESETS: dict[str, tuple[Run, ...]] = {
    "quick": (Run("smollm2-135m", 4096, QUICK_TASKS, 10, "plain,dash@0.5,random@0.5"),),
    # The grids of EVAL.md, at the paper's start layer 0.4 as measured there.
    "full-smollm2": (
        Run("smollm2-135m", 4096, TASKS, 10, MAIN_GRID, 0.4),
        # Start-layer sweep at rho=0.5 (0.4 is dash@0.5 of the main grid, reused from the file).
        Run("smollm2-135m", 4096, QUICK_TASKS, 10, "plain,dash@0.5/d0.25,dash@0.5,dash@0.5/d0.6", 0.4),
    ),
    "full-gemma": (
        Run("gemma3-270m", 8192, TASKS, 10, GEMMA_GRID, 0.4),
        Run("gemma3-270m", 16384, QUICK_TASKS, 10, GEMMA_GRID, 0.4),
    ),
}


def _length(text: str) -> int:
    lengths = parse_lengths(text)
    if len(lengths) != 1:
        raise argparse.ArgumentTypeError(f"give one length (4k); got {text!r}")
    return lengths[0]


def _tasks(text: str) -> tuple[str, ...]:
    if text in ("all", "offline"):
        return TASKS if text == "all" else OFFLINE_TASKS
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    if not tasks:
        raise argparse.ArgumentTypeError(f"give at least one task: all, offline or {', '.join(TASKS)}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown tasks {unknown}; valid: all, offline, {', '.join(TASKS)}")
    return tasks



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``eval`` options to ``parser``."""
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="a predefined grid; explicit options below override its values ("
                        + "; ".join(f"{name}: {PRESET_DURATIONS[name]}" for name in sorted(PRESETS)) + ")")
    parser.add_argument("--model", help="registry name (smollm2-135m, gemma3-270m), directory or hub id")
    parser.add_argument("--tasks", type=_tasks, help="comma-separated task names, 'all' or 'offline'")
    parser.add_argument("--length", type=_length, help="prompt + answer tokens per sample (4k = 4096)")
    parser.add_argument("--samples", type=count_arg(1), help="samples per task")
    parser.add_argument("--policies", help="labels POLICY[-rel]@RATIO[/sLAYER|/dFRACTION][/pPOOL[oOFFSET]]"
                        "[+RATIO/sLAYER...], e.g. 'plain,dash@0.5/d0.4,random@0.5/s7,dash-rel@0.5,"
                        "attention@0.75/s14/p63o16+0.9/s17'; 'calibrated' is the model's recommended "
                        "setting (its calibration profile)")
    parser.add_argument("--start-layer", type=start_layer_arg,
                        help="start of labels that name none: a layer index (7) or a fraction of depth "
                             "(d0.4) (default: the model's recommended start; the results' labels name "
                             "it, e.g. dash@0.5/d0.8; presets full-*: d0.4)")
    parser.add_argument("--seed", type=int, default=42, help="sample generator seed (default 42)")
    parser.add_argument("--out", type=Path, default=Path("eval_results"),
                        help="output directory: results.jsonl, report.md, PNGs")
    parser.add_argument("--fidelity", type=int, default=0, metavar="N",
                        help="also compare every policy with plain prefill on N prompts (>= 50 advised)")
    parser.add_argument("--fidelity-tokens", type=int, default=16, help="greedy tokens compared (default 16)")
    add_threads_option(parser)
    parser.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="float32",
                        help="model dtype (default float32, as on CPU; bfloat16 changes the numbers)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from results.jsonl")


def plan(args: argparse.Namespace) -> list[Run]:
    """The runs the options ask for: a preset's, with explicit options overriding."""
    overrides = {name: getattr(args, name) for name in
                 ("model", "tasks", "length", "samples", "policies", "start_layer")
                 if getattr(args, name, None) is not None}
    if args.preset:
        runs = [replace(run, **overrides) for run in PRESETS[args.preset]]
    else:
        missing = [f"--{n}" for n in ("model", "tasks", "length", "samples", "policies") if n not in overrides]
        if missing:
            raise ValueError(f"without --preset, give {', '.join(missing)} (or use --preset quick)")
        runs = [Run(**overrides)]
    for run in runs:  # a bad label is an error before any model loads (0.5: a stand-in start)
        parse_policies(run.policies, 0.5 if run.start_layer is None else run.start_layer, DashConfig())
    return runs


def _run_all(runs: list[Run], args: argparse.Namespace, results: Path) -> None:
    from dash_prefill.loading import load_model, max_context
    from dash_prefill.core.config import start_text
    from dash_prefill.core.profiles import recommendation
    from dash_prefill.eval.fidelity import evaluate_fidelity

    loaded = {}
    fidelity_done = set()
    for run in runs:
        if run.model not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[run.model] = load_model(run.model, dtype=args.dtype, device=args.device)
        model, tokenizer = loaded[run.model]
        if run.length > max_context(model):
            raise ValueError(f"--length {run.length} exceeds {run.model}'s context of {max_context(model)}")
        calibrated = recommendation(model)
        if "calibrated" in run.policies:
            print(f"calibrated = {calibrated}", flush=True)
        start = run.start_layer
        if start is None:  # the start layer recommended for DASH, for every label alike
            recommended = recommendation(model, "dash")
            start = recommended.config.start_layer
            print(f"{run.model}: labels without a start layer run at {start_text(start)} "
                  f"({recommended.source})", flush=True)
        policies = parse_policies(run.policies, start, calibrated.config)
        layers = model.config.get_text_config().num_hidden_layers
        for _, config in policies:  # every gate inside the model and in order, before any sample
            if config.scores_tokens:
                config.resolve_gates(layers)
        started = time.perf_counter()
        evaluate(model, tokenizer, run.model, run.tasks, run.length, run.samples, policies,
                 results, seed=args.seed)
        logger.info("%s at %d: %.0f s", run.model, run.length, time.perf_counter() - started)
        if args.fidelity and (run.model, run.length) not in fidelity_done:
            # The first run of each (model, length) defines the fidelity grid.
            fidelity_done.add((run.model, run.length))
            evaluate_fidelity(model, tokenizer, run.model, run.tasks, run.length, args.fidelity,
                              [p for p in policies if p[0] != "plain"], results,
                              num_tokens=args.fidelity_tokens, seed=args.seed)


def main(args: argparse.Namespace) -> int:
    """Run the evaluation (unless ``--report-only``), write the report, print a table."""
    results = args.out / "results.jsonl"
    try:
        if not args.report_only:
            runs = plan(args)
            if args.preset:
                print(f"preset {args.preset}: {PRESET_DURATIONS[args.preset]}", flush=True)
            started = time.perf_counter()
            _run_all(runs, args, results)
            print(f"evaluation took {time.perf_counter() - started:.0f} s")
        report = write_report(results, args.out)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text_table(read_records(results)))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":  # python -m dash_prefill.eval.cli: the same as dash-prefill eval
    from dash_prefill.cli import main as cli_main

    sys.exit(cli_main(["eval", *sys.argv[1:]]))

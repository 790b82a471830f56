"""``dash-prefill calibrate``: measure a grid of halting settings on a model, print the front,
write the profile that :func:`dash_prefill.recommended_config` reads, and its plot.

Wire-up: ``add_arguments(subparser)`` adds the options, ``main(args)`` runs and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dash_prefill.calibrate import (DEFAULT_POLICIES, DEFAULT_RATIOS, DEFAULT_STARTS, Budget, BudgetNotMetError,
                        builtin_prompts, choose, measure, plot, read_prompts, settings_grid, table,
                        write_profile)
from dash_prefill.cli import start_layer_arg
from dash_prefill.core.config import start_text
from dash_prefill.core.profiles import profile_path, user_profile_path


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"give comma-separated numbers; got {text!r}") from None


def _starts(text: str) -> tuple[int | float, ...]:
    return tuple(start_layer_arg(x) for x in text.split(",") if x.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``calibrate`` options to ``parser``."""
    parser.add_argument("--model", required=True, help="registry name, model directory or hub id")
    parser.add_argument("--prompts", type=Path, help="JSONL of {\"context\", \"question\"?, "
                        "\"continuation\"?} (default: built-in essay prompts)")
    parser.add_argument("--count", type=int, default=16, help="built-in prompts (default 16)")
    parser.add_argument("--length", type=int, default=4096, help="tokens per built-in prompt (default 4096)")
    parser.add_argument("--budget", type=float, default=Budget.max_kl,
                        help=f"largest mean KL(plain || halted) in nats per token (default {Budget.max_kl})")
    parser.add_argument("--min-agreement", type=float, default=Budget.min_agreement,
                        help=f"smallest top-1 agreement with plain prefill (default {Budget.min_agreement})")
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                        help="NAME[-rel][/pPOOL[oOFFSET]] (dash-rel: the relative score; /p15: scores "
                        "pooled over 15 tokens; /p47o16: that span shifted 16 tokens after the peak), "
                        f"comma-separated (default {','.join(DEFAULT_POLICIES)})")
    parser.add_argument("--settings", default="",
                        help="more settings, as evaluation labels, measured besides the grid: later gates "
                        "(attention@0.3/s8/p47o16+0.75/s14), sparse attention after the gate "
                        "(attention@0.3/s8+0.75/s14~0.05/0.1); --policies '' measures only these")
    parser.add_argument("--starts", type=_starts, default=DEFAULT_STARTS,
                        help="start layers: layer indices (11) or fractions of depth (d0.4), comma-separated "
                        f"(default {','.join(map(start_text, DEFAULT_STARTS))})")
    parser.add_argument("--ratios", type=_floats, default=DEFAULT_RATIOS, help="halt ratios")
    parser.add_argument("--densities", type=_floats, default=(1.0,),
                        help="attention densities before the gate, in (0, 1] (1: dense; 0.1: block-sparse, "
                        "a tenth of the key blocks), comma-separated (default 1)")
    parser.add_argument("--out", type=Path, help="profile path (default: next to the model cache, "
                        "where recommended_config finds it)")
    parser.add_argument("--rows", type=Path, help="choose again from the rows an earlier run measured "
                        "(its .rows.json), under this run's budget, without loading the model")
    parser.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", help="float32 | bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def main(args: argparse.Namespace) -> int:
    """Calibrate, print the front, write the profile and its plot."""
    from dash_prefill.loading import load_model

    try:
        budget = Budget(args.budget, args.min_agreement)
        grid = settings_grid([p.strip() for p in args.policies.split(",") if p.strip()],
                             args.starts, args.ratios,
                             [label.strip() for label in args.settings.split(",") if label.strip()],
                             args.densities)
        if args.count < 1 and args.prompts is None:
            raise ValueError(f"--count must be >= 1; got {args.count}")
        if args.rows is not None:
            return _choose_again(args, budget)
        if args.threads:
            torch.set_num_threads(args.threads)
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        prompts = (read_prompts(args.prompts, tokenizer) if args.prompts
                   else builtin_prompts(tokenizer, args.length, args.count))
        print(f"calibrating {args.model}: {len(grid)} settings on {len(prompts)} prompts "
              f"of ~{sum(len(p.ids) for p in prompts) // len(prompts)} tokens", flush=True)
        started = time.perf_counter()
        rows = measure(model, prompts, grid)
        target = Path(args.out or user_profile_path(model))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.with_suffix(".rows.json").write_text(json.dumps(rows, indent=1) + "\n")  # kept when no setting meets the budget
        chosen = _choose_or_show(rows, budget)
        weight = next(model.parameters())
        about = {"prompts": str(args.prompts) if args.prompts else f"built-in x{len(prompts)} at {args.length}",
                 # recommended only as far as it was measured (longer prompts get plain prefill)
                 "max_prompt_tokens": max([len(p.ids) for p in prompts] + [0 if args.prompts else args.length]),
                 "command": "dash-prefill calibrate " + " ".join(sys.argv[2:]),
                 "device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch."),
                 "seconds": round(time.perf_counter() - started)}
        path = write_profile(target, args.model, chosen, rows, budget, about)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return _report(rows, chosen, path)


def _choose_again(args: argparse.Namespace, budget: Budget) -> int:
    """``--rows``: the choice under ``budget`` from rows measured earlier; the profile records
    the measuring run (``measured``) and this command."""
    if not args.rows.is_file():
        raise FileNotFoundError(f"--rows {args.rows}: no such file (calibrate writes <profile>.rows.json)")
    rows = json.loads(args.rows.read_text())
    measured_profile = args.rows.with_name(args.rows.name.removesuffix(".rows.json") + ".json")
    measured = json.loads(measured_profile.read_text()) if measured_profile.is_file() else {}
    chosen = _choose_or_show(rows, budget)
    about = {"prompts": measured.get("prompts", "unknown"),
             **({"max_prompt_tokens": measured["max_prompt_tokens"]} if "max_prompt_tokens" in measured else {}),
             "command": "dash-prefill calibrate " + " ".join(sys.argv[2:]),
             "measured": {k: measured.get(k) for k in ("command", "device", "dtype", "seconds")},
             "device": measured.get("device"), "dtype": measured.get("dtype")}
    path = write_profile(args.out or profile_path(args.model), args.model, chosen, rows, budget, about)
    return _report(rows, chosen, path)


def _choose_or_show(rows: list[dict], budget: Budget) -> dict:
    """The choice under ``budget``; when none is within it, the table of what was measured is
    printed before the error that names the closest setting."""
    try:
        return choose(rows, budget)
    except BudgetNotMetError:
        print(table(rows))
        raise


def _report(rows: list[dict], chosen: dict, path: Path) -> int:
    print(table(rows, chosen))
    print(f"chosen: {chosen['label']} ({chosen['ideal_speedup']:.2f}x ideal, KL {chosen['kl']:.3f}, "
          f"top-1 {chosen['top1_agreement']:.2f})")
    print(f"profile: {path}\nplot: {plot(rows, chosen, path.with_suffix('.png'))}")
    return 0

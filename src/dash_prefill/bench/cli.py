"""``dash-prefill bench``: time to first token of plain HF, DASH and the hooks press, side by side;
with ``--new-tokens``, generation end to end (:mod:`.e2e`).

Wire-up: ``add_arguments(subparser)`` adds the options, ``main(args)`` runs and prints the table.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from dash_prefill.cli import add_threads_option, count_arg, density_arg, ratio_arg, start_layer_arg
from dash_prefill.bench.e2e import METHODS
from dash_prefill.bench.report import _cell, columns, header, table_lines, write_json, write_plot
from dash_prefill.core.config import DashConfig, policy_config
from dash_prefill.bench.runner import BenchPlan, Target, later_gates, run_bench
from dash_prefill.bench.shapes import ARCHITECTURES, arch_config, build_random_model, least_memory, split_across
from dash_prefill.bench.timing import OtherLoad, trust_warnings
from dash_prefill.bench.vlm import VLM_ARCHITECTURES

logger = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _positive_ints(text: str, what: str, example: str, k_suffix: bool = False) -> list[int]:
    """Comma-separated positive integers (with ``k_suffix``, 4k = 4096); one clear error otherwise."""
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        try:
            value = int(item[:-1]) * 1024 if k_suffix and item.endswith("k") else int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} are positive integers such as {example}; got {item!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{what} must be positive; got {item!r}")
        values.append(value)
    return values


def parse_lengths(text: str) -> list[int]:
    """"4k,32k,1000" -> [4096, 32768, 1000]: a k suffix multiplies by 1024."""
    return _positive_ints(text, "lengths", "4k,32k (4k = 4096)", k_suffix=True)


def _numbers(kind):
    return lambda text: [kind(item.strip()) for item in text.split(",")]


def parse_settings(text: str) -> list[tuple]:
    """"d0.4:0.5,12:0.75" -> [(0.4, 0.5), (12, 0.75)]: explicit (start_layer, halt_ratio) pairs;
    "8:0.3+14:0.75" -> [(8, 0.3, ((14, 0.75),))]: a first gate and later gates (``later_gates``)."""
    settings = []
    for item in text.split(","):
        gates = []
        for gate in item.split("+"):
            start, sep, ratio = gate.partition(":")
            if not sep:
                raise argparse.ArgumentTypeError(f"settings are start:ratio pairs such as d0.4:0.5, later "
                                                 f"gates joined by + (8:0.3+14:0.75); got {item!r}")
            gates.append((start_layer_arg(start.strip()), float(ratio)))
        settings.append(gates[0] if len(gates) == 1 else (*gates[0], tuple(gates[1:])))
    return settings


def parse_new_tokens(text: str) -> list[int]:
    """"1,16,128" -> [1, 16, 128]: positive integers."""
    return _positive_ints(text, "new tokens", "16,128")


def parse_methods(text: str) -> tuple[str, ...]:
    """"hf,dash-static" -> ("hf", "dash-static"): names from METHODS, in METHODS' order."""
    names = {item.strip() for item in text.split(",") if item.strip()}
    unknown = sorted(names - set(METHODS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"methods are some of {','.join(METHODS)}; got {text!r}")
    return tuple(m for m in METHODS if m in names)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number such as 3.35e12; got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser`` (a subcommand parser)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="registry name, local directory or hub id (real weights)")
    source.add_argument("--arch", type=lambda t: [a.strip() for a in t.split(",")],
                        help="random-weight model(s) of a real shape: "
                        f"{', '.join(list(ARCHITECTURES) + list(VLM_ARCHITECTURES))}")
    parser.add_argument("--lengths", type=parse_lengths, default=parse_lengths("4k,8k,32k,128k"),
                        help="prompt lengths, k = 1024 (default 4k,8k,32k,128k)")
    parser.add_argument("--batch", type=lambda t: _positive_ints(t, "batch sizes", "1,4"), default=[1],
                        help="batch sizes (default 1)")
    parser.add_argument("--halt-ratio", type=_numbers(float), default=[0.5, 0.75],
                        help="fractions of tokens halted (ρ), comma-separated")
    parser.add_argument("--start-layer", type=_numbers(start_layer_arg), default=[0.4, 0.25],
                        help="layer indices (7) or fractions of depth (d0.4), comma-separated (default d0.4,d0.25)")
    parser.add_argument("--settings", type=parse_settings,
                        help="explicit start:ratio pairs such as d0.4:0.5,12:0.75 (instead of the start-layer "
                        "x halt-ratio grid); "
                        "later gates joined by +, e.g. 8:0.3+14:0.75 (prefill of text models only)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--attn", choices=["sdpa", "flash_attention_2", "eager"], default="sdpa",
                        help="attention implementation")
    parser.add_argument("--device", choices=["cuda", "cpu"],
                        help="where to run (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--gpus", type=count_arg(1), default=1,
                        help="shard the layers over this many GPUs (accelerate, like device_map='auto')")
    parser.add_argument("--warmup", type=count_arg(0), default=2, help="untimed calls per method first")
    parser.add_argument("--repeats", type=count_arg(1), default=5, help="timed calls per method (median, min, max)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt ids")
    parser.add_argument("--policies", type=lambda t: tuple(p.strip() for p in t.split(",") if p.strip()),
                        default=("dash",), help="halting policies timed per setting, NAME[-rel][/pPOOL[oOFFSET]] "
                        "(default dash; e.g. dash,attention/p15,contribution/p15)")
    parser.add_argument("--densities", type=_densities, default=(1.0,),
                        help="attention densities before the first gate, in (0, 1], comma-separated: each "
                        "policy and setting is timed at each (rows NAME~D; default 1, dense)")
    parser.add_argument("--no-hooks", action="store_true", help="skip the kvpress-style hooks comparison")
    parser.add_argument("--sync-check", action="store_true",
                        help="count host synchronisations of one call per method (CUDA only)")
    parser.add_argument("--out", type=Path, help="directory for bench.json and bench.png "
                        "(bench_e2e.json and bench_e2e.md with --new-tokens)")
    e2e = parser.add_argument_group("end to end (--new-tokens): hf, hf-static, dash, dash-static, dash-compiled, dash-hf")
    e2e.add_argument("--new-tokens", type=parse_new_tokens,
                     help="instead of prefill only, time generating N new tokens (comma-separated): "
                     "TTFT, decode ms/token and total per method")
    e2e.add_argument("--methods", type=parse_methods, default=METHODS,
                     help=f"the methods timed (default all: {','.join(METHODS)})")
    e2e.add_argument("--bandwidth", type=positive_float,
                     help="memory bandwidth in bytes/s for the per-token floor (default: H100 3.35e12, "
                     "H200 4.8e12 by GPU name; none on CPU)")
    add_threads_option(parser)
    vlm = parser.add_argument_group("vision-language archs (llava-1.5-7b, qwen2-vl-7b)")
    vlm.add_argument("--image-tokens", type=lambda t: _positive_ints(t, "image tokens", "576,2304"),
                     help="decoder tokens of the synthetic images (default 576,2304 for llava, "
                     "1024,4096,16384 for qwen2-vl)")
    vlm.add_argument("--text-tokens", type=count_arg(1), default=256, help="text tokens around the images (default 256)")
    vlm.add_argument("--vision-halt-ratio", type=ratio_arg, default=0.5,
                     help="halt ratio inside the vision encoder for the dash+vit rows (default 0.5)")
    vlm.add_argument("--vision-start-layer", type=start_layer_arg, default=0.5,
                     help="start layer inside the vision encoder, a layer index or a fraction of depth (default d0.5)")


def _check_context(name: str, context: int, lengths: list[int]) -> None:
    too_long = [n for n in lengths if n > context]
    if too_long:
        raise ValueError(f"{name} handles at most {context} tokens; lengths {too_long} are longer: "
                         f"drop them from --lengths")


def available_memory(device: torch.device, gpus: int = 1) -> int | None:
    """Bytes free for a run on ``device`` (the sum over ``gpus`` GPUs); None where unknown."""
    if device.type == "cuda":
        return sum(torch.cuda.mem_get_info(i)[0] for i in range(gpus))
    free = []
    try:
        with open("/proc/meminfo") as f:
            free += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit = f.read().strip()
            if limit != "max":
                free.append(int(limit) - int(g.read()))
    except (OSError, ValueError):
        pass
    return min(free) if free else None


def _check_memory(arch: str, dtype: torch.dtype, args) -> None:
    """ValueError with the numbers when ``arch`` at the largest batch and length cannot fit."""
    weights, cache = least_memory(arch, dtype, max(args.batch), max(args.lengths))
    free = available_memory(torch.device(args.device), args.gpus)
    if free is not None and weights + cache > free:
        raise ValueError(
            f"{arch} needs at least {(weights + cache) / 2**30:.1f} GiB ({weights / 2**30:.1f} weights + "
            f"{cache / 2**30:.1f} KV cache at batch {max(args.batch)}, length {max(args.lengths)}) and "
            f"{free / 2**30:.1f} GiB are free on {args.device}; use a GPU, shorter --lengths or a "
            "smaller --arch such as smollm2-135m")


def _densities(text: str) -> tuple[float, ...]:
    values = tuple(density_arg(x) for x in text.split(",") if x.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"give comma-separated densities in (0, 1]; got {text!r}")
    return values


def _check_settings(settings: list[tuple], policies, layers: int | None = None) -> None:
    """ValueError for a setting or policy the bench would refuse later; with ``layers``, also for
    a gate outside a model of that depth (checked before the model loads, not under a progress bar)."""
    for setting in settings:
        start, ratio = setting[:2]
        config = DashConfig(halt_ratio=ratio, start_layer=start, later_gates=later_gates(setting))
        if layers is not None:
            config.resolve_gates(layers)
        for policy in policies:
            policy_config(policy, ratio, start, later_gates(setting))


def _targets(args, dtype: torch.dtype, settings: list[tuple]) -> list[Target]:
    if args.model:
        from dash_prefill.loading import load_model, max_context  # written alongside; imported when used

        # Loaded here, before the progress bar: the context and the gates are checked on it.
        model, _ = load_model(args.model, dtype=dtype, device=args.device, attn_implementation=args.attn)
        _check_context(args.model, max_context(model), args.lengths)
        _check_settings(settings, args.policies, model.config.get_text_config().num_hidden_layers)
        return [Target(args.model, lambda: model)]
    targets = []
    for arch in [a for a in args.arch if a not in VLM_ARCHITECTURES]:
        _check_context(arch, arch_config(arch).max_position_embeddings, args.lengths)
        _check_settings(settings, args.policies, arch_config(arch).num_hidden_layers)
        _check_memory(arch, dtype, args)
        def build(arch=arch):
            model = build_random_model(arch, dtype, args.device, args.attn, args.seed)
            return split_across(model, [f"cuda:{i}" for i in range(args.gpus)])
        targets.append(Target(arch, build))
    return targets


def _vlm_rows(args, settings, device, dtype) -> list[dict]:
    from dash_prefill.bench.vlm import run_vlm_bench

    rows = []
    vision = DashConfig(halt_ratio=args.vision_halt_ratio, start_layer=args.vision_start_layer)
    defaults = {"llava-1.5-7b": [576, 2304], "qwen2-vl-7b": [1024, 4096, 16384]}
    for arch in [a for a in (args.arch or []) if a in VLM_ARCHITECTURES]:
        rows += run_vlm_bench([arch], args.image_tokens or defaults[arch], args.text_tokens, settings,
                              vision, device, dtype, args.attn, args.warmup, args.repeats, args.seed)
    return rows


def print_table(rows: list[dict], syncs: list[dict] = ()) -> None:
    """Print the table to the terminal (rich when installed); the one place that prints."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is None or not Console().is_terminal:
        print("\n".join(table_lines(rows)))  # pipes and logs get plain, unwrapped lines
    else:
        table = Table(title="DASH prefill: time to first token")
        shown = columns(rows)
        for key, title, _ in shown:
            table.add_column(title, justify="left" if key in ("arch", "method") else "right")
        for row in rows:
            table.add_row(*[_cell(row, key, fmt) for key, _, fmt in shown])
        Console().print(table)
    for record in syncs:
        print(f"host syncs: {record['arch']} b={record['batch']} T={record['length']} "
              f"{record['method']} ρ={record['halt_ratio']}: {record['sync_warnings']}")


def _header(args, device: torch.device, dtype: torch.dtype, **extra) -> dict:
    """The header record of a results file: the machine, the command's options and ``extra``."""
    return header(device, dtype=args.dtype or str(dtype).removeprefix("torch."), attn=args.attn, gpus=args.gpus,
                  warmup=args.warmup, repeats=args.repeats, seed=args.seed, **extra)


def _e2e_main(args, settings, device: torch.device, dtype: torch.dtype) -> int:
    """``--new-tokens``: the end-to-end table (bench/e2e.py); ValueError for bad input."""
    from dash_prefill.bench.e2e import bandwidth_for, run_e2e
    from dash_prefill.bench.report import markdown

    if args.arch and any(a in VLM_ARCHITECTURES for a in args.arch):
        raise ValueError("--new-tokens times text models only; drop the vision-language archs from --arch")
    if args.batch != [1]:
        raise ValueError("--new-tokens times batch 1 only; drop --batch")
    for arch in args.arch or []:  # prompt plus new tokens must fit the context
        _check_context(f"{arch} (prompt + {max(args.new_tokens)} new tokens)",
                       arch_config(arch).max_position_embeddings, [n + max(args.new_tokens) for n in args.lengths])
    bandwidth = bandwidth_for(device, args.bandwidth)
    head = _header(args, device, dtype, new_tokens=args.new_tokens, methods=list(args.methods), bandwidth=bandwidth)

    def save(rows: list[dict]) -> None:  # after every length, so a run stopped later keeps these
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            write_json(args.out / "bench_e2e.json", head, rows)
            (args.out / "bench_e2e.md").write_text(markdown([args.out / "bench_e2e.json"]))

    rows = []
    with OtherLoad():
        for target in _targets(args, dtype, settings):
            model = target.load()
            done = list(rows)
            rows += run_e2e(target.name, model, args.lengths, args.new_tokens, settings, device, args.warmup,
                            args.repeats, args.seed, bandwidth, args.methods, lambda new: save(done + new))
            del model
    print("\n".join(table_lines(rows)))
    if bandwidth is None:
        print("floor ms/tok: '-' (no bandwidth known for this device; pass --bandwidth BYTES_PER_S)")
    save(rows)
    if args.out:
        logger.info("wrote %s", args.out / "bench_e2e.json")
    return 0


def main(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; print the table; 0 on success, 2 on bad input."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible; pass --device cpu", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.gpus > 1 and (device.type != "cuda" or torch.cuda.device_count() < args.gpus):
        print(f"error: --gpus {args.gpus} needs that many visible GPUs; "
              f"{torch.cuda.device_count()} are visible", file=sys.stderr)
        return 2
    settings = args.settings or [(s, r) for s in args.start_layer for r in args.halt_ratio]
    try:
        _check_settings(settings, args.policies)
        vlm = any(a in VLM_ARCHITECTURES for a in args.arch or [])
        if any(later_gates(s) for s in settings) and (args.new_tokens or vlm):
            raise ValueError("settings with later gates (8:0.3+14:0.75) are timed by the prefill bench of "
                             "text models only: drop --new-tokens and the vision-language archs")
        if args.new_tokens:
            return _e2e_main(args, settings, device, dtype)
        plan = BenchPlan(targets=_targets(args, dtype, settings), lengths=args.lengths, batches=args.batch,
                         settings=settings, device=device, warmup=args.warmup, repeats=args.repeats,
                         hooks=not args.no_hooks, sync_check=args.sync_check, seed=args.seed,
                         policies=args.policies, densities=args.densities)
        if args.arch:
            logger.info("random weights: time to first token depends on the shapes, not the weight values")
        head = _header(args, device, dtype)

        def save(rows: list[dict], syncs: list[dict]) -> None:  # after every length: a run stopped later keeps these
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                write_json(args.out / "bench.json", head, rows, syncs)

        with OtherLoad() as load:
            rows, syncs = run_bench(plan, save) if plan.targets else ([], [])
            rows += _vlm_rows(args, settings, device, dtype)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_table(rows, syncs)
    timed = {f"{r['arch']} b={r['batch']} T={r['length']} {r['method']} ρ={r['halt_ratio']}":
             [r["min_s"], r["median_s"], r["max_s"]] for r in rows if r.get("median_s") is not None}
    for line in trust_warnings(timed, load.cores if device.type == "cpu" else None):
        print(f"warning: {line}", file=sys.stderr)
    if args.out:
        save(rows, syncs)
        write_plot(args.out / "bench.png", rows)
        logger.info("wrote %s", args.out / "bench.json")
    return 0


if __name__ == "__main__":  # python -m dash_prefill.bench.cli: the same as dash-prefill bench
    from dash_prefill.cli import main as cli_main

    sys.exit(cli_main(["bench", *sys.argv[1:]]))

"""Command line: ``dash-prefill demo | run | bench | eval | inspect``. Only this layer prints."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .config import DashConfig

DEMO_MODEL = "smollm2-135m"
# Subcommands built on top of the core, each a module with add_arguments(parser) and main(args).
TOOLS = {
    "bench": ("dash_prefill.bench.cli", "measure time to first token: plain vs DASH vs hook-based"),
    "eval": ("dash_prefill.eval.cli", "RULER-style accuracy and fidelity of halting policies"),
    "calibrate": ("dash_prefill.calibrate", "choose the fastest halting setting that stays faithful"),
}


def start_layer_arg(text: str) -> int | float:
    """argparse type of every ``--start-layer``: "12" is a layer index, "0.4" a fraction of depth."""
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"start layer is a layer index (12) or a fraction of depth (0.4); got {text!r}") from None


def _add_dash_options(parser: argparse.ArgumentParser, ratio: float = 0.5) -> None:
    parser.add_argument("--halt-ratio", type=float, default=ratio, help="fraction of tokens halted (ρ)")
    parser.add_argument("--start-layer", type=start_layer_arg, default=None,
                        help="layer index, or fraction of depth such as 0.4 (default: the "
                             "embedded model's measured recommendation, else 0.4)")
    parser.add_argument("--protect-last", type=int, default=64, help="final prompt tokens always kept")
    parser.add_argument("--score", choices=["absolute", "relative"], default="absolute")
    parser.add_argument("--frozen-keys", action="store_true",
                        help="halted tokens stay visible as keys/values in later layers")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")


def _config(args, model) -> DashConfig:
    start = args.start_layer
    if start is None:
        spec = getattr(model, "dash_prefill_spec", None)
        start = spec.recommended_start_layer if spec is not None else 0.4
    return DashConfig(halt_ratio=args.halt_ratio, start_layer=start,
                      protect_last=args.protect_last, score=args.score, frozen_keys=args.frozen_keys)


def _print_comparison(result, answer: str | None = None) -> None:
    stats = result.dash.stats
    saved = stats.kv_saved_fraction
    rows = [
        ("prompt tokens", f"{result.prompt_tokens}"),
        ("DASH setting", f"halt_ratio={result.config.halt_ratio}, start_layer={stats.start_layer}/{stats.num_layers}"),
        ("time to first token, plain", f"{result.plain_ttft:.3f} s"),
        ("time to first token, DASH", f"{result.dash_ttft:.3f} s"),
        ("speedup (measured)", f"{result.speedup:.2f}x"),
        ("speedup (ideal, cost model)", f"{stats.ideal_speedup:.2f}x"),
        ("tokens halted", f"{stats.halted_tokens[0]} of {stats.prompt_tokens[0]}"),
        ("KV-cache tokens saved", f"{saved:.1%} ({sum(stats.kv_tokens_per_layer)} of "
                                  f"{sum(stats.plain_kv_tokens_per_layer)} layer-tokens kept)"),
        ("answer, plain", repr(result.plain.texts[0].strip())),
        ("answer, DASH", repr(result.dash.texts[0].strip())),
    ]
    if answer is not None:
        rows.append(("expected answer", repr(answer)))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _load(name: str, dtype: str | None):
    from .loading import load_model

    return load_model(name, dtype=dtype)


def cmd_demo(args) -> int:
    from .demo import compare, needle_prompt

    model, tokenizer = _load(args.model, args.dtype)
    prompt = needle_prompt(tokenizer, args.tokens)
    result = compare(model, tokenizer, prompt.text, _config(args, model), args.max_new_tokens, args.repeats)
    print(f"DASH demo on {args.model} ({next(model.parameters()).device}): a fact hidden in the middle "
          f"of {result.prompt_tokens} tokens of essays")
    _print_comparison(result, prompt.answer)
    return 0


def cmd_run(args) -> int:
    from .demo import chat_prompt, compare

    text = sys.stdin.read() if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8").read()
    if not text.strip():
        raise ValueError("the prompt file is empty: give a file with the prompt text")
    model, tokenizer = _load(args.model, args.dtype)
    prompt = text if args.raw else chat_prompt(tokenizer, text)
    _print_comparison(compare(model, tokenizer, prompt, _config(args, model), args.max_new_tokens,
                              args.repeats))
    return 0


def cmd_inspect(args) -> int:
    from .inspect import inspect_prompt

    text = sys.stdin.read() if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8").read()
    config = DashConfig(halt_ratio=args.halt_ratio, start_layer=args.start_layer,
                        policy=args.policy, score=args.score, protect_last=args.protect_last)
    model, tokenizer = _load(args.model, args.dtype)
    found = inspect_prompt(model, tokenizer, text, config, args.out)
    stats = found.stats
    print(f"{stats.prompt_tokens[0]} tokens, {len(found.halted)} halted after layer {stats.start_layer}, "
          f"ideal speedup {stats.ideal_speedup:.2f}x")
    print(f"plot: {found.plot_path}\npage: {found.html_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dash-prefill", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="plain vs DASH prefill on a long prompt, embedded model")
    demo.add_argument("--model", default=DEMO_MODEL)
    demo.add_argument("--tokens", type=int, default=6000, help="prompt length in tokens")
    _add_dash_options(demo)
    demo.set_defaults(handler=cmd_demo)
    run = commands.add_parser("run", help="plain vs DASH prefill on your own prompt and model")
    run.add_argument("--model", required=True, help="registry name, local path or HF id")
    run.add_argument("--prompt-file", required=True, help="text file with the prompt, or - for stdin")
    run.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    _add_dash_options(run)
    run.set_defaults(handler=cmd_run)
    inspect = commands.add_parser("inspect", help="per-layer ||U|| of a prompt and which tokens halt")
    inspect.add_argument("--model", required=True, help="registry name, directory or hub id")
    inspect.add_argument("--prompt-file", required=True, help="text file with the prompt; '-' reads stdin")
    inspect.add_argument("--policy", default="dash", choices=("dash", "random", "attention", "none"))
    inspect.add_argument("--out", default="inspect_out", help="directory for the PNG and the HTML page")
    inspect.add_argument("--halt-ratio", type=float, default=0.5)
    inspect.add_argument("--start-layer", type=start_layer_arg, default=0.4)
    inspect.add_argument("--protect-last", type=int, default=64)
    inspect.add_argument("--score", choices=["absolute", "relative"], default="absolute")
    inspect.add_argument("--dtype", default=None)
    inspect.set_defaults(handler=cmd_inspect)
    for name, (module, help_text) in TOOLS.items():
        sub = commands.add_parser(name, help=help_text)
        try:
            tool = importlib.import_module(module)
        except ImportError as error:
            sub.set_defaults(handler=lambda args, e=error: _unavailable(e))
            continue
        tool.add_arguments(sub)
        sub.set_defaults(handler=tool.main)
    return parser


def _unavailable(error: ImportError) -> int:
    print(f"error: this command needs a package that is missing: {error}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, ImportError, NotImplementedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

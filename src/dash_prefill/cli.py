"""Command line: ``dash-prefill demo | run | bench | eval | inspect``. Only this layer prints."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import TYPE_CHECKING

from dash_prefill import __version__

if TYPE_CHECKING:
    from dash_prefill.core.config import DashConfig

DESCRIPTION = ("Faster prefill of long prompts by DASH (Delta Attention Selective Halting): compare "
               "plain and DASH prefill on a prompt, benchmark, evaluate accuracy, inspect what halts.")

DEMO_MODEL = "smollm2-135m"
# Subcommands built on top of the core, each a module with add_arguments(parser) and main(args).
TOOLS = {
    "bench": ("dash_prefill.bench.cli", "measure time to first token: plain vs DASH vs hook-based (end to end with --new-tokens)"),
    "eval": ("dash_prefill.eval.cli", "RULER-style accuracy and fidelity of halting policies"),
    "calibrate": ("dash_prefill.calibrate_cli", "choose the fastest halting setting that stays faithful"),
    "serve": ("dash_prefill.serve_cli", "print the vllm serve command that runs a model with DASH"),
}


def start_layer_arg(text: str) -> int | float:
    """argparse type of every start layer option: "12" or "s12" is a layer index, "d0.4" a fraction
    of depth, as labels write them (:func:`dash_prefill.core.config.parse_start_layer`)."""
    from dash_prefill.core.config import parse_start_layer

    try:
        return parse_start_layer(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def density_arg(text: str) -> float:
    """argparse type of ``--density``: a number in (0, 1], checked before any model loads."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"density must be a number in (0, 1] (1: dense attention); got {text!r}")
    return value


def ratio_arg(text: str) -> float:
    """argparse type of ``--halt-ratio``: a number in [0, 1), checked before any model loads."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"halt ratio must be a number in [0, 1); got {text!r}")
    return value


def count_arg(minimum: int):
    """argparse type of an integer option that must be at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {value}")
        return value
    return parse


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are two lines (the error, where help is), exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n(see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` where an option has a default worth showing and its help has none."""

    def _get_help_string(self, action):
        if (action.default in (None, False) or action.default is argparse.SUPPRESS
                or "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads``, applied by :func:`main` before the command runs."""
    parser.add_argument("--threads", type=count_arg(1),
                        help="torch CPU threads (default: the cores no other process keeps busy "
                             "now, at most torch's choice); 1 gives steadier times on a busy CPU")


RECOMMENDED = "default: the model's recommended setting"


def default_threads() -> int:
    """torch's thread count less the cores other processes keep busy now (sampled for 0.1 s), at
    least 1: a thread that shares its core with another process stalls every parallel op
    (docs/decisions.md, "CPU threads")."""
    import os
    import time

    import torch

    from dash_prefill.bench.timing import OtherLoad

    if torch.get_num_threads() == 1:  # nothing to leave out (OMP_NUM_THREADS=1, a 1-core machine)
        return 1
    with OtherLoad() as load:
        time.sleep(0.1)
    if load.cores is None:
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), round(os.cpu_count() - load.cores)))


def add_setting_options(parser: argparse.ArgumentParser) -> None:
    """The options demo, run and inspect share: the halting options (each one left out comes
    from the model's recommended setting, see :func:`setting`), ``--dtype`` and ``--threads``."""
    parser.add_argument("--halt-ratio", type=ratio_arg, help=f"fraction of tokens halted, ρ ({RECOMMENDED})")
    parser.add_argument("--start-layer", type=start_layer_arg,
                        help=f"layer index (7) or fraction of depth (d0.4) ({RECOMMENDED})")
    parser.add_argument("--protect-last", type=count_arg(0), default=64, help="final prompt tokens always kept")
    parser.add_argument("--density", type=density_arg,
                        help=f"attention kept before the first gate, block-sparse below 1 ({RECOMMENDED})")
    parser.add_argument("--later-density", type=density_arg,
                        help=f"the same after the first gate (full-attention layers, gates excepted) ({RECOMMENDED})")
    parser.add_argument("--score", choices=["absolute", "relative"],
                        help=f"||U|| (absolute) or ||U||/||h|| (relative) ({RECOMMENDED})")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    add_threads_option(parser)


def _add_dash_options(parser: argparse.ArgumentParser) -> None:
    add_setting_options(parser)
    parser.add_argument("--max-new-tokens", type=count_arg(1), default=32, help="length of the answers")
    parser.add_argument("--repeats", type=count_arg(1), default=3, help="timed runs per method (median)")


def setting(args, model, prompt_tokens: int | None = None) -> tuple[DashConfig, str]:
    """The halting setting of a command: the options given, the rest from the model's
    recommended setting (:func:`dash_prefill.core.profiles.recommendation`), and where it came from.
    With no option given, the recommendation is for a prompt of ``prompt_tokens``."""
    from dataclasses import replace

    from dash_prefill.core.profiles import recommendation

    given = {name: getattr(args, name) for name in ("halt_ratio", "start_layer", "score", "density", "later_density")
             if getattr(args, name, None) is not None}
    found = recommendation(model, getattr(args, "policy", None), None if given else prompt_tokens)
    recommended, source = found.config, found.source
    config = replace(recommended, **given, protect_last=args.protect_last)
    if given:
        options = ", ".join("--" + name.replace("_", "-") for name in given)
        source = f"{options} as given, the rest from the {source}"
    return config, source


def _print_setting(config: DashConfig, source: str) -> None:
    print(f"DASH setting: {config.label} ({source})", flush=True)


def _print_comparison(result, answer: str | None = None) -> None:
    stats = result.dash.stats
    saved = stats.kv_saved_fraction
    rows = [
        ("prompt tokens", f"{result.prompt_tokens}"),
        ("DASH setting", f"{result.config.label} (layer {stats.start_layer} of {stats.num_layers})"),
        ("time to first token, plain", _seconds(result.plain_ttft, result.plain_times)),
        ("time to first token, DASH", _seconds(result.dash_ttft, result.dash_times)),
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
    from dash_prefill.bench.timing import trust_warnings

    for line in trust_warnings({"plain prefill": list(result.plain_times), "DASH prefill": list(result.dash_times)},
                               result.other_cores):
        print(f"warning: {line}", file=sys.stderr)


def _seconds(median: float, times) -> str:
    """"1.234 s (median of 3: 1.200-1.300 s)"."""
    if len(times) < 2:
        return f"{median:.3f} s"
    return f"{median:.3f} s (median of {len(times)}: {min(times):.3f}-{max(times):.3f} s)"


def _load(name: str, dtype: str | None):
    from dash_prefill.loading import load_model

    return load_model(name, dtype=dtype)


def _read_prompt(path: str) -> str:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ValueError(f"cannot read the prompt file {path!r} ({reason}): give a text file, "
                         "or - to read stdin") from None
    if not text.strip():
        raise ValueError("the prompt file is empty: give a file with the prompt text")
    return text


def cmd_demo(args) -> int:
    from dash_prefill.demo import compare, needle_prompt
    from dash_prefill.hf.generation import check_fits

    model, tokenizer = _load(args.model, args.dtype)
    check_fits(model, None, args.tokens, args.max_new_tokens)  # before building the prompt
    prompt = needle_prompt(tokenizer, args.tokens)
    tokens = len(tokenizer(prompt.text)["input_ids"])
    config, source = setting(args, model, tokens)
    check_fits(model, config, tokens, args.max_new_tokens)  # the setting's gates lie inside the model
    print(f"DASH demo on {args.model} ({next(model.parameters()).device}): a fact hidden in the middle "
          f"of {tokens} tokens of essays", flush=True)
    _print_setting(config, source)
    result = compare(model, tokenizer, prompt.text, config, args.max_new_tokens, args.repeats)
    _print_comparison(result, prompt.answer)
    return 0


def cmd_run(args) -> int:
    from dash_prefill.demo import compare
    from dash_prefill.hf.generation import chat_prompt

    text = _read_prompt(args.prompt_file)
    model, tokenizer = _load(args.model, args.dtype)
    prompt = text if args.raw else chat_prompt(tokenizer, text)
    config, source = setting(args, model, len(tokenizer(prompt)["input_ids"]))
    _print_setting(config, source)
    _print_comparison(compare(model, tokenizer, prompt, config, args.max_new_tokens, args.repeats))
    return 0


def cmd_inspect(args) -> int:
    from dash_prefill.hf.generation import chat_prompt
    from dash_prefill.inspect import inspect_prompt

    text = _read_prompt(args.prompt_file)
    model, tokenizer = _load(args.model, args.dtype)
    prompt = text if args.raw else chat_prompt(tokenizer, text)
    config, source = setting(args, model, len(tokenizer(prompt)["input_ids"]))
    _print_setting(config, source)
    found = inspect_prompt(model, tokenizer, text, config, args.out, chat=not args.raw)
    stats = found.stats
    print(f"{stats.prompt_tokens[0]} tokens, {len(found.halted)} halted after layer {stats.start_layer}, "
          f"ideal speedup {stats.ideal_speedup:.2f}x")
    print(f"plot: {found.plot_path}\npage: {found.html_path}")
    return 0


def _add_demo(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--model", default=DEMO_MODEL, help="registry name or model directory")
    demo.add_argument("--tokens", type=count_arg(1), default=6000, help="prompt length in tokens")
    _add_dash_options(demo)
    demo.set_defaults(handler=cmd_demo)


def _add_run(run: argparse.ArgumentParser) -> None:
    run.add_argument("--model", required=True, help="registry name or local model directory (hub ids need hub access)")
    run.add_argument("--prompt-file", required=True, help="text file with the prompt, or - for stdin")
    run.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    _add_dash_options(run)
    run.set_defaults(handler=cmd_run)


def _add_inspect(inspect: argparse.ArgumentParser) -> None:
    from dash_prefill.core.config import POLICIES

    inspect.add_argument("--model", required=True, help="registry name or local model directory (hub ids need hub access)")
    inspect.add_argument("--prompt-file", required=True, help="text file with the prompt; '-' reads stdin")
    inspect.add_argument("--raw", action="store_true",
                         help="do not wrap the prompt in the chat template (run wraps it the same way)")
    inspect.add_argument("--policy", choices=POLICIES,
                         help=f"which halting rule marks the halted tokens ({RECOMMENDED})")
    inspect.add_argument("--out", default="inspect_out", help="directory for the PNG and the HTML page")
    add_setting_options(inspect)
    inspect.set_defaults(handler=cmd_inspect)


def _add_tool(module: str):
    def add(sub: argparse.ArgumentParser) -> None:
        try:
            tool = importlib.import_module(module)
        except ImportError as error:
            sub.set_defaults(handler=lambda args, e=error: _unavailable(e))
            return
        tool.add_arguments(sub)
        sub.set_defaults(handler=tool.main)
    return add


# Every command: its help line and what adds its options.
COMMANDS = {
    "demo": ("plain vs DASH prefill on a long prompt, embedded model", _add_demo),
    "run": ("plain vs DASH prefill on your own prompt and model", _add_run),
    "inspect": ("per-layer ||U|| of a prompt and which tokens halt", _add_inspect),
    **{name: (help_text, _add_tool(module)) for name, (module, help_text) in TOOLS.items()},
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the command named there gets its options (the others
    their help line), so ``--help`` and ``--version`` import no tool and no torch (seconds)."""
    named = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    parser = Parser(prog="dash-prefill", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_options) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if named is None or named == name:
            add_options(sub)
    return parser


def _unavailable(error: ImportError) -> int:
    print(f"error: this command needs a package that is missing: {error}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if hasattr(args, "threads"):
            import torch

            previous, threads = torch.get_num_threads(), args.threads or default_threads()
            logging.getLogger(__name__).info("%d CPU thread%s", threads, "s" if threads > 1 else "")
            torch.set_num_threads(threads)
            try:
                return args.handler(args)
            finally:
                torch.set_num_threads(previous)
        return args.handler(args)
    except (ValueError, OSError, ImportError, NotImplementedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

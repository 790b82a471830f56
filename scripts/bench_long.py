"""Long-context prefill on one GPU (issue 29): SDPA backends for one layer's attention, then the
prefill of real shapes with random weights under plain, halting alone, block-sparse attention
alone and both, each against its FLOP ideal (``stats.ideal_speedup``) and against plain.

Usage: python scripts/bench_long.py OUT [--archs llama-3.1-8b,qwen2.5-7b] [--lengths 32k,128k]
       [--labels L1,L2,...] [--repeats 2] [--kernels]
Writes OUT/bench_long.json and prints a table. Times are CUDA-event medians after one untimed call
(which compiles FlexAttention). The runs in results/bench/h100-2026-12-06-long came from commits
0bb4d2f..5ff1c92, which also ran ``plain`` a second time with cuDNN forced (the same logits and time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from dash_prefill.bench.shapes import build_random_model
from dash_prefill.core.config import DashConfig
from dash_prefill.hf.prefill import prefill

LABELS = ("plain,dash@0.5/d0.4,attention@0.3/d0.25/p47o16+0.75/d0.5,plain~0.1,dash@0.5/d0.4~0.1,"
          "attention@0.3/d0.25/p47o16+0.75/d0.5~0.1,attention@0.3/d0.25/p47o16+0.75/d0.5~0.05")


def timed(fn, repeats: int) -> list[float]:
    fn()  # untimed: compiles, warms the allocator
    seconds = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        seconds.append(start.elapsed_time(end) / 1000)
    return seconds


def kernels(length: int, repeats: int) -> list[dict]:
    """One causal attention of the 8B shape (32 query / 8 key-value heads, bf16) per SDPA backend,
    and FlexAttention dense (density 1 as a block mask) and block-sparse."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from dash_prefill.hf.attention import SparsePrompt, prefill_attention

    torch.manual_seed(0)
    q = torch.randn(1, 32, length, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    rows = []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for gqa in (True, False):
            kk, vv = (k, v) if gqa else (k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))

            def run():
                with sdpa_kernel([backend]):
                    torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
            try:
                rows.append({"kernel": f"sdpa-{name}" + ("-gqa" if gqa else "-repeat"), "length": length,
                             "seconds": statistics.median(timed(run, repeats))})
            except RuntimeError as error:
                rows.append({"kernel": f"sdpa-{name}" + ("-gqa" if gqa else "-repeat"), "length": length,
                             "error": str(error).splitlines()[0][:120]})
    for density in (1.0, 0.1, 0.05):
        sparse = SparsePrompt.of(density, [length], length, q.device) if density < 1 else None
        if sparse is None:  # dense through FlexAttention: every causal block kept
            sparse = SparsePrompt.of(1.0, [length], length, q.device)
        rows.append({"kernel": f"flex-density-{density}", "length": length, "seconds": statistics.median(
            timed(lambda: prefill_attention(None, q, k, v, None, scaling=128 ** -0.5, dash_sparse=sparse), repeats))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--archs", default="llama-3.1-8b")
    parser.add_argument("--lengths", default="32k,128k")
    parser.add_argument("--labels", default=LABELS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kernels", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in args.lengths.split(",")]
    rows: list[dict] = []
    device = torch.cuda.get_device_name()
    if args.kernels:
        for length in lengths:
            rows += kernels(length, 3)
            print(*(f"{r['kernel']:>22} {length:>7} " + (f"{r['seconds'] * 1000:8.1f} ms" if "seconds" in r else r["error"])
                    for r in rows if r["length"] == length), sep="\n", flush=True)
    for arch in args.archs.split(","):
        model = build_random_model(arch, torch.bfloat16, "cuda")
        for length in lengths:
            ids = torch.randint(100, 30000, (1, length), device="cuda")
            for label in args.labels.split(","):
                config = DashConfig.from_label(label)
                try:
                    seconds = timed(lambda: prefill(model, ids, config), args.repeats)
                except torch.OutOfMemoryError:
                    rows.append({"arch": arch, "length": length, "label": label, "error": "oom"})
                    torch.cuda.empty_cache()
                    continue
                result = prefill(model, ids, config)
                row = {"arch": arch, "length": length, "label": label, "device": device,
                       "seconds": statistics.median(seconds), "all_seconds": seconds,
                       "ideal_speedup": result.stats.ideal_speedup,
                       "kept_fraction": result.stats.kept_tokens[0] / length}
                del result
                rows.append(row)
                print(f"{arch} {length} {label}: {row['seconds']:.3f} s", flush=True)
        del model
        torch.cuda.empty_cache()
    (out / "bench_long.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    print("\n| arch | tokens | setting | s | x plain | ideal | of ideal |")
    for row in rows:
        if "seconds" not in row or "arch" not in row:
            continue
        plain = min(r["seconds"] for r in rows if r.get("label") == "plain" and r.get("arch") == row["arch"]
                    and r["length"] == row["length"] and "seconds" in r)
        speedup = plain / row["seconds"]
        print(f"| {row['arch']} | {row['length']} | {row['label']} | {row['seconds']:.3f} | "
              f"{speedup:.2f} | {row['ideal_speedup']:.2f} | {speedup / row['ideal_speedup']:.2f} |")


if __name__ == "__main__":
    main()

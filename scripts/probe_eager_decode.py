"""Why eager decoding after a halting prefill is slower than after a plain one on a GPU.

Usage: python scripts/probe_eager_decode.py [ARCH] [LENGTH]   (default llama-3.1-8b 32768)
For rho = 0 and 0.5 (start 0.4): eager ``decode_step`` ms/token over 20 steps, the host syncs
of one step (sync debug mode), and the top operators of one step by host and by CUDA time.
"""

import sys
import time
import warnings

import torch

from dash_prefill import DashConfig, prefill
from dash_prefill.bench.shapes import build_random_model
from dash_prefill.bench.timing import random_ids
from dash_prefill.hf.decode import decode_step


def main(arch="llama-3.1-8b", length="32768"):
    model = build_random_model(arch, torch.bfloat16, torch.device("cuda"), "sdpa")
    ids = random_ids(1, int(length), model.config.vocab_size, "cuda")
    for ratio in (0.0, 0.5):
        config = DashConfig(halt_ratio=ratio, start_layer=0.4, protect_first=4, protect_last=64)
        with torch.inference_mode():
            state = prefill(model, ids, config)
            token = state.logits.argmax(-1)[:, None]
            for _ in range(3):
                decode_step(model, state, token)
            torch.cuda.synchronize()
            begin = time.perf_counter()
            for _ in range(20):
                decode_step(model, state, token)
            torch.cuda.synchronize()
            step_ms = (time.perf_counter() - begin) / 20 * 1e3
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                decode_step(model, state, token)
                torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("default")
            syncs = [str(w.message)[:80] for w in caught if "synchroniz" in str(w.message)]
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                decode_step(model, state, token)
                torch.cuda.synchronize()
        print(f"\n== rho={ratio}: eager decode_step {step_ms:.2f} ms/token, {len(syncs)} host syncs "
              f"{syncs[:3]}", flush=True)
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))
        print(table.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=50))
        del state
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(*sys.argv[1:])

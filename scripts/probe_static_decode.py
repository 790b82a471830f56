"""Where the time of one static decoding step goes on a GPU (random weights, real shapes).

Usage: python scripts/probe_static_decode.py [ARCH] [LENGTH...]   (default llama-3.1-8b 8192 32768)
Prints per length and ρ: building the decoder, the first (eager, then captured) step, the
replayed step and the eager step in ms, with grouped attention on and off (off: HF's sdpa, which
repeats the keys and values), then the top CUDA kernels of one eager step.
"""

import contextlib
import sys
import time

import torch

import dash_prefill.hf.static_decode as sd
from dash_prefill import DashConfig, prefill
from dash_prefill.bench.shapes import build_random_model
from dash_prefill.bench.timing import random_ids


def ms(fn, repeats=1):
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - begin) / repeats * 1e3, out


def main(arch="llama-3.1-8b", *lengths):
    lengths = [int(n) for n in lengths] or [8192, 32768]
    model = build_random_model(arch, torch.bfloat16, torch.device("cuda"), "sdpa")
    grouped = sd.grouped_attention
    for length in lengths:
        ids = random_ids(1, length, model.config.vocab_size, "cuda")
        for ratio in (0.0, 0.5):
            config = DashConfig(halt_ratio=ratio, start_layer=0.4, protect_first=4, protect_last=64)
            for use_grouped in (True, False):
                sd.grouped_attention = grouped if use_grouped else (lambda config: contextlib.nullcontext())
                with torch.inference_mode():
                    state = prefill(model, ids, config)
                    token = state.logits.argmax(-1)[:, None]
                    build, step = ms(lambda: sd.static_step(model, state, 200))
                    first, _ = ms(lambda: step(token))
                    replay, _ = ms(lambda: step(token), 100)
                    decoder = sd.StaticDecoder(model, state, 200)
                    decoder.step(token)
                    eager, _ = ms(lambda: decoder.step(token), 20)
                print(f"T={length} rho={ratio} grouped={use_grouped}: build {build:.1f} ms, first step "
                      f"{first:.1f} ms, replay {replay:.2f} ms/token, eager {eager:.2f} ms/token", flush=True)
                del state, step, decoder
                torch.cuda.empty_cache()
        sd.grouped_attention = grouped
        with torch.inference_mode():
            state = prefill(model, ids, DashConfig(halt_ratio=0.5, start_layer=0.4, protect_first=4, protect_last=64))
            decoder = sd.StaticDecoder(model, state, 200)
            decoder.step(token)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                decoder.step(token)
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        del state, decoder
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(*sys.argv[1:])

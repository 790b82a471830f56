"""Where the first decoded tokens of a compiled static decode spend their time (GPU, random weights).

Usage: python scripts/probe_decode_steps.py [ARCH] [LENGTH] [MODE...]   (default llama-3.1-8b 8192 fresh pooled)
For each MODE, four consecutive prefill + decode calls of 64 tokens (ρ=0): the time to build the
decoder, each of the first 8 steps (a sync after each), the mean of steps 9-63, the address of
layer 0's key buffer and the change of torch's inductor/dynamo counters. "fresh": every call
allocates new buffers (the library before buffers were kept); "kept": the library, whose compiled
decoder writes into the buffers the last call left, so the step sees the same static addresses.
"""

import collections
import sys
import time

import torch
from torch._dynamo.utils import counters

import dash_prefill.hf.static_decode as sd
from dash_prefill import DashConfig, prefill
from dash_prefill.bench.shapes import build_random_model
from dash_prefill.bench.timing import random_ids

class FreshDecoder(sd.StaticDecoder):
    """The library's decoder without kept buffers: every call allocates its own."""

    def __init__(self, model, state, new_tokens, keep=False):
        super().__init__(model, state, new_tokens, keep=False)
        sd._KEPT[model] = (self.buffers(), lambda: None)  # for the address printed


def snapshot():
    return {f"{group}.{name}": value for group in ("inductor", "stats", "recompiles")
            for name, value in counters[group].items()}


def main(arch="llama-3.1-8b", length="8192", *modes):
    modes = modes or ("fresh", "kept")
    model = build_random_model(arch, torch.bfloat16, torch.device("cuda"), "sdpa")
    ids = random_ids(1, int(length), model.config.vocab_size, "cuda")
    config = DashConfig(halt_ratio=0.0, start_layer=0.4, protect_first=4, protect_last=64)
    original = sd.StaticDecoder
    for mode in modes:
        sd.StaticDecoder = FreshDecoder if mode == "fresh" else original
        for call in range(4):
            before = snapshot()
            with torch.inference_mode():
                state = prefill(model, ids, config)
                token = state.logits.argmax(-1)[:, None]
                torch.cuda.synchronize()
                began = time.perf_counter()
                step = sd.static_step(model, state, 63, "compiled")
                torch.cuda.synchronize()
                build = (time.perf_counter() - began) * 1e3
                times = []
                for _ in range(63):
                    began = time.perf_counter()
                    token = step(token).argmax(-1)[:, None]
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - began) * 1e3)
            changed = {k: v - before.get(k, 0) for k, v in snapshot().items() if v != before.get(k, 0)}
            address = sd._KEPT[model][0][0].data_ptr()
            print(f"{mode} call {call}: build {build:.1f} ms; steps 1-8 " + " ".join(f"{t:.1f}" for t in times[:8])
                  + f"; mean 9-63 {sum(times[8:]) / len(times[8:]):.2f} ms; sum {sum(times):.0f} ms"
                  + f"; keys[0] at {address:#x}" + f"; counters {dict(changed)}", flush=True)
            del state, step
    sd.StaticDecoder = original


if __name__ == "__main__":
    main(*sys.argv[1:])

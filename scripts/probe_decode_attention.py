"""GPU time of one decoding step's attention (one query per row, GQA) over a long cache, per layer.

Usage: python scripts/probe_decode_attention.py [KEYS...]   (default 8256 32832 130624: slots)
Llama-3.1-8B's shape (32 query heads, 8 key heads, head_dim 128, bf16, batch 1). 32 layers'
worth of distinct caches are captured in one CUDA graph (so no layer reads another's keys from
L2 and no launch is timed), replayed 20 times. Prints µs per layer and the bytes of keys and
values read per second: torch's products (cuBLAS, ``decode.products_attention``), the Triton
flash-decoding kernel at its defaults, with other part counts and with other block sizes, warps
and pipeline stages, and HF's sdpa (which repeats the keys and values for GQA). The last line
names the fastest kernel setting at each length.
"""

import sys

import torch
import torch.nn.functional as F

from dash_prefill.hf.decode import products_attention
from dash_prefill.hf.flash_decode import flash_decode, parts_for, sm_count

LAYERS, HEADS, KV_HEADS, DIM = 32, 32, 8, 128


def per_layer_us(step) -> float:
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up on a side stream, as capture asks
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / 20 / LAYERS


def main(*lengths):
    keys_list = [int(n) for n in lengths] or [8256, 32832, 130624]
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, {sm_count(device)} SMs, torch {torch.__version__}")
    print("| keys | method | µs/layer | TB/s (K+V) |\n|---|---|---|---|")
    for keys in keys_list:
        query = torch.randn(1, KV_HEADS, HEADS // KV_HEADS, DIM, device=device, dtype=torch.bfloat16)
        caches = [(torch.randn(1, KV_HEADS, keys, DIM, device=device, dtype=torch.bfloat16),
                   torch.randn(1, KV_HEADS, keys, DIM, device=device, dtype=torch.bfloat16))
                  for _ in range(LAYERS)]
        mask = torch.ones(1, 1, 1, keys, dtype=torch.bool, device=device)
        mask[..., -100:] = False  # unwritten slots
        bytes_per_layer = 2 * keys * KV_HEADS * DIM * 2
        timed = {}

        def time(name, attend):
            def step():
                for key, value in caches:
                    attend(key, value)
            timed[name] = us = per_layer_us(step)
            print(f"| {keys} | {name} | {us:.1f} | {bytes_per_layer / us / 1e6:.2f} |", flush=True)

        time("cuBLAS products", lambda k, v: products_attention(query, k, v, mask, DIM ** -0.5))
        parts = parts_for(KV_HEADS, keys, sm_count(device))
        for n in sorted({parts, max(1, parts // 2), parts * 2, parts * 4}):
            time(f"triton, {n} parts{' (default)' if n == parts else ''}",
                 lambda k, v, n=n: flash_decode(query, k, v, mask, DIM ** -0.5, parts=n))
        for block in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (1, 2, 3):
                    time(f"triton, {parts} parts, block {block}, {warps} warps, {stages} stages",
                         lambda k, v, b=block, w=warps, st=stages: flash_decode(
                             query, k, v, mask, DIM ** -0.5, parts=parts, block_keys=b, num_warps=w, num_stages=st))
        best = min((name for name in timed if name.startswith("triton")), key=timed.get)
        print(f"| {keys} | fastest: {best} | {timed[best]:.1f} | |", flush=True)
        hf_query = query.reshape(1, HEADS, 1, DIM)

        def sdpa():
            for key, value in caches:
                F.scaled_dot_product_attention(hf_query, key.repeat_interleave(4, 1),
                                               value.repeat_interleave(4, 1), attn_mask=mask)
        us = per_layer_us(sdpa)
        print(f"| {keys} | HF sdpa (repeated keys) | {us:.1f} | {bytes_per_layer / us / 1e6:.2f} |", flush=True)
        del caches
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(*sys.argv[1:])

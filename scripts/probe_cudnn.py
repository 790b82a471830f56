"""Why the prefill's dense attention did not reach cuDNN on the H100 (issue 29): cuDNN alone on
the 8B shape's tensors under no_grad / inference_mode, with and without enable_gqa, the warnings
torch gives, and a 4-layer 8B-shape plain prefill at 128K with DASH_PREFILL_SDPA=torch vs cudnn."""

import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dash_prefill import DashConfig, prefill
from dash_prefill.bench.shapes import arch_config, build_random_model
from dash_prefill.hf import attention

T = 131072
q = torch.randn(1, 32, T, 128, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for mode in (torch.no_grad, torch.inference_mode):
    for gqa in (True, False):
        kk, vv = (k, v) if gqa else (k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))
        with mode(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    F.scaled_dot_product_attention(q, kk, vv, is_causal=True, scale=128 ** -0.5, enable_gqa=gqa)
                print(mode.__name__, "gqa" if gqa else "repeat", "cudnn ran")
            except RuntimeError as error:
                print(mode.__name__, "gqa" if gqa else "repeat", "cudnn refused:", str(error).splitlines()[0][:200])
            for w in caught:
                print("   warning:", str(w.message).splitlines()[0][:200])

calls = {"cudnn": 0, "refused": 0}
original = attention.causal_cudnn


def counted(*args):
    calls["cudnn"] += 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = original(*args)
    calls["refused"] += sum("cuDNN" in str(w.message) or "cudnn" in str(w.message) for w in caught)
    if caught and calls["cudnn"] == 1:
        print("   in-model warning:", str(caught[0].message).splitlines()[0][:200])
    return out


attention.causal_cudnn = counted
config = arch_config("llama-3.1-8b")
config.num_hidden_layers = 4
model = build_random_model("llama-3.1-8b", torch.bfloat16, "cuda", config=config)
ids = torch.randint(100, 30000, (1, T), device="cuda")
for sdpa in ("torch", "cudnn", "torch", "cudnn"):
    os.environ["DASH_PREFILL_SDPA"] = sdpa
    torch.cuda.synchronize()
    start = time.perf_counter()
    prefill(model, ids, DashConfig.from_label("plain"))
    torch.cuda.synchronize()
    print(f"4-layer plain 128K {sdpa}: {time.perf_counter() - start:.3f} s, causal_cudnn calls {calls}")

"""Where a prefill synchronises the host (CUDA): the Python stack of every synchronising call.

    DASH_TEST_DEVICE=cuda python scripts/probe_syncs.py gemma3 llama

Runs the left-padded and the unpadded prefill of tests/test_cuda_syncs.py on tiny models and
prints, for each synchronising CUDA call, the innermost frames of its stack.
"""

import sys
import traceback
import warnings

import torch

sys.path.insert(0, "tests")
torch.set_default_device("cuda")
from conftest import build_model, random_ids  # noqa: E402
from dash_prefill import DashConfig, prefill  # noqa: E402


def run(family: str, padded: bool) -> None:
    model = build_model(family)
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :11] = 0
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_last=3)
    prefill(model, ids, config, attention_mask=mask if padded else None)
    torch.cuda.synchronize()
    stacks = []
    shown = warnings.showwarning
    warnings.showwarning = lambda message, *a, **k: stacks.append([f"{message}\n"] + traceback.format_stack()[:-2])
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        prefill(model, ids, config, attention_mask=mask if padded else None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = shown
    print(f"== {family} padded={padded}: {len(stacks)} sync(s)")
    for stack in stacks:
        print(stack[0] + "".join(stack[-5:]))


for name in sys.argv[1:] or ["gemma3", "llama"]:
    for padded in (True, False):
        run(name, padded)

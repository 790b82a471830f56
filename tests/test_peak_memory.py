"""Peak memory of a prefill that halts nothing equals the model's own forward's.

Measured on the CPU from the allocator events of torch.profiler (deterministic, no timing). The
shape makes the feed-forward sublayer the peak, as FlashAttention / SDPA make it on a GPU.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import COMMON, random_ids
from dash_prefill import DashConfig, prefill
from dash_prefill.hf.generation import plain_prefill

SEQ, HIDDEN = 512, 256


def _peak_bytes(fn) -> int:
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profile, torch.no_grad():
        fn()
    events = sorted((e.time_range.start, e.cpu_memory_usage) for e in profile.events() if e.cpu_memory_usage)
    current = peak = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=16 * HIDDEN, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=COMMON["vocab_size"])
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to("cpu").eval()


@pytest.mark.parametrize("policy", ["dash", "none"])
def test_a_prefill_that_halts_nothing_peaks_no_higher_than_the_models_forward(model, policy, one_thread):
    ids = random_ids(1, SEQ).cpu()
    plain = _peak_bytes(lambda: plain_prefill(model, ids))
    config = DashConfig(halt_ratio=0.0, start_layer=1, policy=policy, protect_last=0 if policy == "none" else 64)
    ours = _peak_bytes(lambda: prefill(model, ids, config))
    hidden_state = SEQ * HIDDEN * 4  # one (seq, hidden) float32 tensor
    assert ours <= plain + hidden_state // 4, f"{(ours - plain) / hidden_state:+.2f} hidden states above plain"

"""A gate on another device than the embeddings (run with DASH_TEST_DEVICE=cuda).

A model split over devices builds its halting record (``Eligibility``: protected tokens,
padding) where the embeddings live and selects where the gate layer lives. On a CPU alone there
is no second device that holds numbers (the meta device holds none), so these tests need a GPU:
the CPU is the first device and the GPU the second.
"""

import os

import pytest
import torch
from torch.testing import assert_close

from conftest import build_model, random_ids
from dash_prefill import DashConfig, decode_step, prefill
from dash_prefill.core.policy import Eligibility

pytestmark = pytest.mark.skipif(os.environ.get("DASH_TEST_DEVICE") != "cuda",
                                reason="needs DASH_TEST_DEVICE=cuda")

CPU, GPU = torch.device("cpu"), torch.device("cuda:0")


def test_a_record_built_on_one_device_selects_among_scores_on_another():
    lengths, seq_len = [12, 7], 12
    record = Eligibility.of_prompt(lengths, seq_len, 0.5, protect_first=1, protect_last=2, device=CPU)
    assert record.protected.device == CPU and record.padding.device == CPU
    scores = torch.rand(2, seq_len, generator=torch.Generator().manual_seed(0), device="cpu")
    on_cpu, on_gpu = record.select(scores), record.select(scores.to(GPU))
    assert on_gpu.index.device.type == "cuda" and on_gpu.filled.device.type == "cuda"
    assert torch.equal(on_gpu.index.cpu(), on_cpu.index) and torch.equal(on_gpu.filled.cpu(), on_cpu.filled)


def _split(model, first_on_gpu: int):
    """Embeddings, rotary tables and layers before ``first_on_gpu`` on the CPU, the rest on the GPU."""
    model.to(CPU)
    for layer in model.model.layers[first_on_gpu:]:
        layer.to(GPU)
    model.model.norm.to(GPU)
    model.lm_head.to(GPU)
    return model


@pytest.mark.parametrize("first_on_gpu, gates", [
    (1, dict()),  # the start layer is the first on the GPU
    (2, dict(later_gates=((2, 0.75),), pool=3)),  # the start layer on the CPU, the later gate on the GPU
], ids=["start-gate-on-gpu", "later-gate-on-gpu"])
def test_gates_on_another_device_than_the_embeddings_halt_as_on_one_device(family, first_on_gpu, gates):
    ids = random_ids(2, 40).cpu()
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # a left-padded row: the record holds padding too
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_first=2, protect_last=3, **gates)
    whole = build_model(family).to(GPU)
    expected = prefill(whole, ids.to(GPU), config, attention_mask=mask.to(GPU))
    split = _split(build_model(family), first_on_gpu)
    result = prefill(split, ids, config, attention_mask=mask)
    assert torch.equal(result.active_mask.cpu(), expected.active_mask.cpu())
    assert_close(result.logits.cpu(), expected.logits.cpu(), atol=1e-4, rtol=1e-4)
    token = expected.logits.argmax(-1)[:, None]
    assert_close(decode_step(split, result, token.cpu()).cpu(), decode_step(whole, expected, token).cpu(),
                 atol=1e-4, rtol=1e-4)

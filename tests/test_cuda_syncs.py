"""Host synchronisations of a prefill on a GPU (run with DASH_TEST_DEVICE=cuda).

An unpadded prefill makes none: every shape it needs (the compacted width, the window crop, the
KV accounting) is known on the host from the prompt's length and the config. A left-padded batch
makes one, before any layer runs: the row lengths set the compacted width.
"""

import os
import warnings

import pytest
import torch

from conftest import build_model, random_ids
from dash_prefill import DashConfig, decode_step, prefill

pytestmark = pytest.mark.skipif(os.environ.get("DASH_TEST_DEVICE") != "cuda",
                                reason="needs DASH_TEST_DEVICE=cuda")

CONFIGS = [DashConfig(halt_ratio=0.5, start_layer=1, protect_last=3),
           DashConfig(halt_ratio=0.0, start_layer=1),
           DashConfig(halt_ratio=0.5, start_layer=2, protect_last=3, policy="attention", pool=3),
           DashConfig(halt_ratio=0.25, start_layer=1, protect_last=3, policy="random"),
           DashConfig(policy="none"),
           DashConfig(policy="none", density=0.2),  # block-sparse attention in every layer
           DashConfig(halt_ratio=0.5, start_layer=2, protect_last=3, policy="attention", pool=3, density=0.2),
           DashConfig(halt_ratio=0.25, start_layer=1, protect_last=3, policy="attention", pool=3,  # and after it
                      later_gates=((2, 0.5),), density=0.2, later_density=0.2)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label if c.scores_tokens else f"plain~{c.density}")
def test_unpadded_prefill_and_decoding_never_sync_the_host(family, config):
    model = build_model(family)
    ids = random_ids(2, 40)
    token = torch.ones(2, 1, dtype=torch.long)
    decode_step(model, prefill(model, ids, config), token)  # warm-up: lazy CUDA initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = prefill(model, ids, config)
        logits = decode_step(model, result, token)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (2, model.config.vocab_size)


def test_left_padded_prefill_syncs_the_host_once(family):
    model = build_model(family)
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_last=3)
    prefill(model, ids, config, attention_mask=mask)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            prefill(model, ids, config, attention_mask=mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Only the sync warnings: the first use of the debug mode in a process also warns that the
    # mode is a prototype ("does not yet detect all synchronizing operations").
    assert sum("called a synchronizing CUDA operation" in str(w.message) for w in caught) == 1

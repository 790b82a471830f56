"""The KV-cache figures of PrefillStats are the sizes of the cache itself, sliding windows included."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from conftest import COMMON, build_model, random_ids
from dash_prefill import DashConfig, prefill


def _held(cache):
    return [layer.keys.shape[0] * layer.keys.shape[2] for layer in cache.layers]


@pytest.mark.parametrize("halt_ratio", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("padded", [False, True])
def test_reported_kv_sizes_equal_what_the_cache_and_hfs_cache_hold(family, halt_ratio, padded):
    model = build_model(family)
    ids = random_ids(2, 40)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :13] = 0
    config = DashConfig(halt_ratio=halt_ratio, start_layer=1, protect_first=2, protect_last=3)
    result = prefill(model, ids, config, attention_mask=mask)
    stats = result.stats
    assert result.stats.kv_tokens_per_layer == _held(result.cache)
    plain = model(ids, attention_mask=mask, use_cache=True).past_key_values
    assert stats.plain_kv_tokens_per_layer == _held(plain)
    assert stats.kv_saved_fraction == pytest.approx(1 - sum(_held(result.cache)) / sum(_held(plain)))


def test_sliding_window_on_every_layer_saves_nothing_once_the_window_is_full():
    config = MistralConfig(**{**COMMON, "max_position_embeddings": 512}, sliding_window=40)
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    stats = prefill(model, random_ids(1, 257), DashConfig(halt_ratio=0.33, start_layer=1)).stats
    assert stats.kv_tokens_per_layer == [39, 39, 39, 39]
    assert stats.plain_kv_tokens_per_layer == [39, 39, 39, 39]
    assert stats.kv_saved_fraction == 0.0


def test_gemma3_counts_its_sliding_layers_at_their_window():
    # Layers: sliding(8), sliding(8), full, sliding(8); 40 tokens, 20 kept from layer 2 on.
    model = build_model("gemma3")
    stats = prefill(model, random_ids(1, 40), DashConfig(halt_ratio=0.5, start_layer=2, protect_last=2)).stats
    assert stats.kv_tokens_per_layer == [7, 7, 20, 7]
    assert stats.plain_kv_tokens_per_layer == [7, 7, 40, 7]
    assert stats.kv_saved_fraction == pytest.approx(1 - 41 / 61)

"""The cost model: plain prefill costs 1x, and the method.md fractions in their limits."""

import pytest

from conftest import FAMILIES
from dash_prefill.core.cost import attended_pairs, ideal_speedup, prefill_flops


def test_plain_prefill_has_unit_speedup():
    config = FAMILIES["llama"][1]()
    assert ideal_speedup(config, 1000, 4, kept_fraction=0.5) == 1.0
    assert ideal_speedup(config, 1000, 1, kept_fraction=1.0) == pytest.approx(1.0)


def test_speedup_grows_with_the_halt_ratio_and_with_an_earlier_start():
    config = FAMILIES["llama"][1]()
    assert ideal_speedup(config, 4096, 1, 0.25) > ideal_speedup(config, 4096, 1, 0.5) > 1.0
    assert ideal_speedup(config, 4096, 1, 0.5) > ideal_speedup(config, 4096, 2, 0.5)


def test_short_prompts_follow_the_linear_fraction_of_method_md():
    # With attention negligible and the vocabulary tiny, FLOPs left follow (s + (L-s)(1-rho)) / L,
    # except that the start layer's attention sublayer runs on every token (it makes the score).
    config = FAMILIES["llama"][1]()
    seq_len, start, keep, layers = 8, 1, 0.5, 4
    full = prefill_flops(config, seq_len, layers)
    dash = prefill_flops(config, seq_len, start, keep)
    d = 64
    attn_share = (2 * d * 16 * (2 * 4 + 2 * 2)) / (2 * d * 16 * (2 * 4 + 2 * 2) + 6 * d * 96)
    expected = (start + attn_share * (1 - keep) + (layers - start) * keep) / layers
    assert dash / full == pytest.approx(expected, rel=0.05)


def test_sliding_window_limits_attended_pairs():
    assert attended_pairs(10, None) == 55
    assert attended_pairs(10, 4) == 10 + 6 * 4


def test_a_later_gate_costs_the_tokens_entering_each_layer():
    """Layer by layer by hand: 4 layers, gates at 1 (keep 1/2) and 2 (keep 1/4), 64 tokens."""
    from transformers import LlamaConfig

    from dash_prefill.core.cost import attended_pairs, prefill_flops

    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=10)
    head, kv = 4, 2 * 8 * 4 * 2 * 1
    projections, mlp, per_pair = 2 * 8 * 4 * 2 * 2 + kv, 2 * 3 * 8 * 16, 4 * 2 * 4
    by_hand = 2.0 * 8 * 10  # last position's logits
    by_hand += (projections + mlp) * 64 + per_pair * attended_pairs(64, None)  # layer 0
    by_hand += projections * 64 + per_pair * attended_pairs(64, None) + mlp * 32  # gate 1
    by_hand += projections * 32 + per_pair * attended_pairs(32, None) + mlp * 16  # gate 2
    by_hand += (projections + mlp) * 16 + per_pair * attended_pairs(16, None)  # layer 3
    assert head == 8 // 2
    assert prefill_flops(config, 64, 1, 0.5, later_gates=[(2, 0.25)]) == by_hand
    assert prefill_flops(config, 64, 1, 0.5, later_gates=[(2, 0.25)]) < prefill_flops(config, 64, 1, 0.5)


"""Selection of the active set: counts, protection, padding, determinism."""

import pytest
import torch

from dash_prefill import DashConfig
from dash_prefill.core.policy import (POLICIES, delta_norm, halted_count, random_scores, select_active, span_max,
                                 window_attention)


@pytest.mark.parametrize("seq_len,ratio,kept", [(100, 0.5, 50), (101, 0.33, 68), (64, 0.75, 16),
                                                (10, 0.9, 1), (100, 0.29, 71), (100, 0.57, 43),
                                                (1000, 0.001, 999), (7, 0.5, 4)])
def test_a_row_halts_the_floor_of_rho_t_computed_in_decimal(seq_len, ratio, kept):
    # 0.29 * 100 is 28.999... in floating point; the decimal floor halts 29.
    selection = select_active(torch.rand(1, seq_len), [seq_len], ratio, protect_first=0, protect_last=1)
    assert selection.index.shape[1] == kept
    assert selection.kept_per_row == [kept]
    assert halted_count(seq_len, ratio) == seq_len - kept


def test_last_token_and_protected_windows_stay_active_even_with_the_lowest_scores():
    scores = torch.arange(50, 0, -1).float()[None]  # the end of the prompt scores lowest
    selection = select_active(scores, [50], 0.8, protect_first=3, protect_last=5)
    kept = set(selection.index[0].tolist())
    assert {0, 1, 2, 45, 46, 47, 48, 49} <= kept
    assert len(kept) == 50 - int(0.8 * 50)


def test_last_token_is_kept_when_no_window_is_protected():
    scores = torch.arange(20, 0, -1).float()[None]
    selection = select_active(scores, [20], 0.9, protect_first=0, protect_last=0)
    assert 19 in selection.index[0].tolist()


def test_protection_forces_more_tokens_than_the_ratio_allows():
    selection = select_active(torch.rand(1, 20), [20], 0.9, protect_first=4, protect_last=8)
    assert selection.index.shape[1] == 12


def test_highest_scores_win_and_indices_are_ascending():
    scores = torch.tensor([[0.1, 5.0, 0.2, 4.0, 0.3, 3.0, 0.0, 1.0]])
    selection = select_active(scores, [8], 0.5, protect_first=0, protect_last=1)
    assert selection.index[0].tolist() == [1, 3, 5, 7]


def test_padding_is_halted_first_and_rows_keep_their_own_count():
    scores = torch.rand(2, 10)
    scores[1, :4] = 100.0  # padding with huge scores must still never be chosen as real
    selection = select_active(scores, [10, 6], 0.5, protect_first=0, protect_last=1)
    assert selection.kept_per_row == [5, 3]
    assert selection.index.shape == (2, 5)
    real = selection.index[1][selection.filled[1]]
    assert real.numel() == 3 and bool((real >= 4).all())


def test_zero_ratio_keeps_everything_without_filler():
    selection = select_active(torch.rand(2, 7), [7, 7], 0.0, protect_first=0, protect_last=0)
    assert selection.filled is None
    assert selection.index.tolist() == [list(range(7))] * 2


def test_random_scores_are_reproducible_and_seed_dependent():
    device = torch.device("cpu")
    assert torch.equal(random_scores(2, 9, 3, device), random_scores(2, 9, 3, device))
    assert not torch.equal(random_scores(2, 9, 3, device), random_scores(2, 9, 4, device))


def test_sliding_maximum_keeps_the_neighbours_of_a_high_score_and_ignores_padding():
    scores = torch.tensor([[9.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0]])
    assert span_max(scores, 3)[0].tolist() == [9.0, 9.0, 0.0, 5.0, 5.0, 5.0, 0.0, 0.0]
    padding = torch.tensor([[True, False, False, False, False, False, False, False]])
    assert span_max(scores, 3, padding)[0, 1:].tolist() == [0.0, 0.0, 5.0, 5.0, 5.0, 0.0, 0.0]
    assert torch.equal(span_max(scores, 1), scores)


def test_every_registered_policy_is_a_valid_config_and_says_whether_it_reads_the_question():
    for name, function in POLICIES.items():
        assert DashConfig(policy=name).policy == name
        assert function.query_aware in (True, False)
    assert not POLICIES["dash"].query_aware and POLICIES["attention"].query_aware


def test_an_offset_span_lies_after_the_high_score_by_the_offset():
    scores = torch.tensor([[0.0, 0.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert span_max(scores, 5, offset=2)[0].tolist() == [0.0] * 3 + [7.0] * 5 + [0.0]
    assert span_max(scores, 5, offset=-2)[0].tolist() == [7.0] * 4 + [0.0] * 5
    assert span_max(scores, 5)[0].tolist() == [0.0] + [7.0] * 5 + [0.0] * 3


@pytest.mark.parametrize("offset", [3, -3, 1.0, True])
def test_pool_offset_must_be_an_int_within_half_the_pool(offset):
    with pytest.raises(ValueError, match="pool_offset must be an int"):
        DashConfig(pool=5, pool_offset=offset)


@pytest.mark.parametrize("pool", [0, 2, -1, 1.0, True])
def test_pool_must_be_an_odd_positive_int(pool):
    with pytest.raises(ValueError, match="pool must be an odd int"):
        DashConfig(pool=pool)


def test_delta_norm_upcast_in_chunks_equals_the_whole_float32_norm():
    torch.manual_seed(0)
    update = torch.randn(2, 9000, 48, dtype=torch.bfloat16)  # longer than one 4096-token chunk
    hidden = torch.randn(2, 9000, 48, dtype=torch.bfloat16)
    whole = update.float().norm(dim=-1)
    assert torch.equal(delta_norm(update), whole)
    assert torch.allclose(delta_norm(update, hidden), whole / hidden.float().norm(dim=-1), rtol=1e-6)
    assert torch.equal(delta_norm(update[0]), whole[0])  # packed (seq, d), as Qwen2-VL's encoder scores


def test_window_attention_of_grouped_heads_equals_attention_over_repeated_keys():
    torch.manual_seed(0)
    queries, keys = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 30, 16)
    positions = torch.arange(30).expand(2, 30)
    ours = window_attention(queries, keys, positions[:, -5:], positions, None, 0.25)
    repeated = keys.repeat_interleave(4, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", queries, repeated) * 0.25
    causal = positions[:, None, None, :] <= positions[:, -5:][:, None, :, None]
    assert torch.allclose(ours, logits.masked_fill(~causal, float("-inf")).softmax(-1), atol=1e-6)

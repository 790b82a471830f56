"""Selection of the active set: counts, protection, padding, determinism."""

import pytest
import torch

from dash_prefill import DashConfig
from dash_prefill.policy import (HOPS, POLICIES, ScoreContext, attention_mass, delta_norm, halted_count,
                                 random_scores, select_active, span_max, window_attention)


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


def test_attention_mass_is_the_causal_softmax_weight_on_the_marked_keys():
    torch.manual_seed(0)
    queries, keys = torch.randn(2, 4, 30, 8), torch.randn(2, 2, 30, 8)
    marked = torch.rand(2, 30) > 0.6
    logits = torch.einsum("bhqd,bhkd->bhqk", queries, keys.repeat_interleave(2, dim=1)) * 0.5
    logits = logits.masked_fill(~torch.ones(30, 30, dtype=torch.bool).tril(), float("-inf"))
    expected = (logits.softmax(-1) * marked[:, None, None, :]).sum(-1).mean(1)  # (batch, seq)
    torch.testing.assert_close(attention_mass(queries, keys, marked, 0.5), expected)


def test_hops_follow_a_chain_of_mentions_from_what_the_question_finds():
    # One head, 300 tokens: the question (last 5) looks at token 10; token 100's query looks at
    # token 10's key, token 200's at token 100's, 280's at 200's. The chain is found in order,
    # and nothing else is (the hops' zone keeps them off the chain's neighbours).
    seq, dim = 300, 16
    keys = torch.zeros(1, 1, seq, dim)
    queries = torch.zeros(1, 1, seq, dim)
    chain = [10, 100, 200, 280]
    for axis, token in enumerate(chain[:4]):
        keys[0, 0, token, axis] = 1.0
    queries[0, 0, -5:, 0] = 50.0  # the question -> token 10
    for axis, token in enumerate(chain[1:4]):
        queries[0, 0, token, axis] = 50.0  # token 100 -> 10, 200 -> 100, 280 -> 200
    config = DashConfig(halt_ratio=0.5, protect_first=2, protect_last=5, policy="attention-hops")
    context = ScoreContext(output=None, hidden=torch.zeros(1, seq, 4), config=config, padding=None,
                           window_queries=lambda: queries[:, :, -5:], keys=keys, values=keys,
                           positions=torch.arange(seq)[None], scaling=1.0, queries=lambda: queries)
    scores = POLICIES["attention-hops"](context)
    found = scores > context.attention().mean(dim=(1, 2)).amax()
    assert found.sum() == HOPS
    assert found[0, chain[:4]].all()  # the fifth token is wherever the last hop's mass is highest


def test_dash_or_attention_keeps_a_token_either_signal_ranks_first_and_halts_one_both_rank_last():
    # 40 tokens, one head: the question (last 4) attends most to token 5 and least to token
    # 30; token 20 has the largest update and token 30 the smallest (no ties elsewhere).
    seq, dim = 40, 8
    keys = torch.zeros(1, 1, seq, dim)
    keys[0, 0, :, 0] = torch.linspace(0.0, 0.1, seq)
    keys[0, 0, 5, 0], keys[0, 0, 30, 0] = 1.0, -1.0
    queries = torch.zeros(1, 1, seq, dim)
    queries[0, 0, -4:, 0] = 30.0
    output = torch.linspace(1.0, 2.0, seq)[None, :, None].expand(1, seq, dim).clone()
    output[0, 20] *= 10.0
    output[0, 30] *= 0.1
    config = DashConfig(halt_ratio=0.5, protect_first=1, protect_last=4, policy="dash-or-attention")
    context = ScoreContext(output=output, hidden=torch.zeros(1, seq, dim), config=config, padding=None,
                           window_queries=lambda: queries[:, :, -4:], keys=keys, values=keys,
                           positions=torch.arange(seq)[None], scaling=1.0)
    scores = POLICIES["dash-or-attention"](context)[0]
    assert scores[5] == scores[20] == 1.0  # the top rank of one signal each
    assert scores[30] == 1 / seq and (scores > 1 / seq).sum() == seq - 1  # last of both: alone at the bottom
    assert POLICIES["dash-or-attention"].query_aware

"""Selection of the active set: counts, protection, padding, determinism."""

import pytest
import torch

from dash_prefill.policy import random_scores, select_active


@pytest.mark.parametrize("seq_len,ratio", [(100, 0.5), (101, 0.33), (64, 0.75), (10, 0.9)])
def test_kept_count_is_exactly_t_minus_int_rho_t(seq_len, ratio):
    scores = torch.rand(1, seq_len)
    selection = select_active(scores, [seq_len], ratio, protect_first=0, protect_last=1)
    assert selection.index.shape[1] == seq_len - int(ratio * seq_len)
    assert selection.kept_per_row == [seq_len - int(ratio * seq_len)]


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
    real = selection.index[1][selection.valid[1]]
    assert real.numel() == 3 and bool((real >= 4).all())


def test_zero_ratio_keeps_everything_without_filler():
    selection = select_active(torch.rand(2, 7), [7, 7], 0.0, protect_first=0, protect_last=0)
    assert selection.valid is None
    assert selection.index.tolist() == [list(range(7))] * 2


def test_random_scores_are_reproducible_and_seed_dependent():
    device = torch.device("cpu")
    assert torch.equal(random_scores(2, 9, 3, device), random_scores(2, 9, 3, device))
    assert not torch.equal(random_scores(2, 9, 3, device), random_scores(2, 9, 4, device))

"""Under tensor parallelism each rank holds some attention heads: the scores a rank computes with
its heads and one all-reduce equal the scores of all heads, so every rank keeps the same tokens;
ties are broken by index, never by a reduction order."""

import itertools

import pytest
import torch

from dash_prefill.core.config import DashConfig
from dash_prefill.core.policy import POLICIES, Eligibility, ScoreContext

HEADS, KV_HEADS, SEQ, DIM = 8, 4, 96, 16


def _tensors(seed=0):
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    return dict(output=draw(1, SEQ, 32), hidden=draw(1, SEQ, 32), queries=draw(1, HEADS, SEQ, DIM),
                keys=draw(1, KV_HEADS, SEQ, DIM), values=draw(1, KV_HEADS, SEQ, DIM))


def _context(tensors, config, rank=0, ranks=1, all_reduce=None):
    """The ScoreContext of ``rank`` when the heads are split evenly over ``ranks``."""
    q, kv = HEADS // ranks, KV_HEADS // ranks
    window = max(config.protect_last, 1)
    queries = tensors["queries"][:, rank * q:(rank + 1) * q]
    return ScoreContext(
        output=tensors["output"], hidden=tensors["hidden"], config=config, padding=None,
        window_queries=lambda: queries[:, :, -window:], keys=tensors["keys"][:, rank * kv:(rank + 1) * kv],
        values=tensors["values"][:, rank * kv:(rank + 1) * kv], positions=torch.arange(SEQ)[None],
        scaling=DIM ** -0.5, all_reduce=all_reduce, ranks=ranks)


def _scores_of_every_rank(policy, tensors, config, ranks):
    """Each rank's scores, its all-reduces summing what every rank contributes to them."""
    partials = [[] for _ in range(ranks)]
    for rank in range(ranks):  # what each rank hands to each all-reduce
        POLICIES[policy](_context(tensors, config, rank, ranks, lambda t, r=rank: partials[r].append(t) or t))

    def summed():  # the i-th all-reduce a rank makes returns the sum of every rank's i-th
        calls = itertools.count()

        def all_reduce(tensor):
            call = next(calls)
            return sum(contributed[call] for contributed in partials)
        return all_reduce

    return [POLICIES[policy](_context(tensors, config, rank, ranks, summed())) for rank in range(ranks)]


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("ranks", [2, 4])
def test_every_rank_scores_and_keeps_what_one_rank_with_every_head_does(policy, ranks):
    config = DashConfig(halt_ratio=0.5, start_layer=1, policy=policy, protect_last=8)
    tensors = _tensors()
    alone = POLICIES[policy](_context(tensors, config))
    eligibility = Eligibility.of_prompt([SEQ], SEQ, 0.5, config.protect_first, config.protect_last)
    kept = eligibility.select(alone).index
    for scores in _scores_of_every_rank(policy, tensors, config, ranks):
        torch.testing.assert_close(scores, alone, rtol=1e-5, atol=1e-7)
        assert torch.equal(eligibility.select(scores).index, kept)


def test_tied_scores_keep_the_earliest_tokens_every_time():
    eligibility = Eligibility.of_prompt([SEQ], SEQ, 0.5, 4, 8)
    tied = torch.ones(1, SEQ)
    first = eligibility.select(tied).index[0].tolist()
    assert first == list(range(SEQ // 2 - 8)) + list(range(SEQ - 8, SEQ))  # 48 kept: the last 8 and the 40 first
    assert all(eligibility.select(tied.clone()).index[0].tolist() == first for _ in range(5))

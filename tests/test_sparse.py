"""Block-sparse attention before the first gate (DashConfig.density < 1) and after it
(DashConfig.later_density < 1)."""

import math

import pytest
import torch
from torch.testing import assert_close

from conftest import FAMILIES, build_model, random_ids
from vlms import build_vlm, vlm_inputs
from dash_prefill import DashConfig, decode_step, prefill
from dash_prefill.core.cost import ideal_speedup
from dash_prefill.core.sparse import BLOCK, block_estimate, grid, select_blocks, sparse_fraction
from dash_prefill.core.policy import Eligibility
from dash_prefill.hf.prefill import later_sparse, prefill_branches
from dash_prefill.hf.attention import SparsePrompt, flex_attention, gathered_attention, prefill_attention

LONG = 1800  # 15 blocks of 128: past the sink and the local band (9 blocks) a query block skips some
LATER = 3000  # after a gate halting 20%: 2400 tokens, 19 blocks, so the layers after it skip some too


def long_model(family: str, implementation: str = "sdpa"):
    model = build_model(family, implementation)
    model.config.max_position_embeddings = 4096
    return model


def spec_attention(q, k, v, length, density, scale):
    """Written from the specification, one row alone: (heads, length, dim) queries, keys and
    values of real tokens -> (heads, length, dim)."""
    heads, kv_heads = q.shape[0], k.shape[0]
    pad = -length % 128
    blocks = (length + pad) // 128
    block = [(i + pad) // 128 for i in range(length)]
    out = torch.empty_like(q)
    for h in range(heads):
        keys, values = k[h * kv_heads // heads], v[h * kv_heads // heads]
        window = min(128, length)
        mass = torch.zeros(blocks, dtype=torch.float64, device="cpu")
        for i in range(length - window, length):
            probs = ((q[h, i] @ keys[:i + 1].T) * scale).softmax(-1)
            mass.index_add_(0, torch.tensor(block[:i + 1], device="cpu"), probs.double().cpu())
        mass = mass.tolist()
        ranked = sorted(range(blocks), key=lambda b: (-mass[b], b))
        for i in range(length):
            # beyond the sink (block 0) and the band (the 8 blocks before and its own), the query's
            # block keeps ceil(density x its other blocks) of them, the highest ranked it can see
            others = [b for b in ranked if b <= block[i] and b != 0 and block[i] - b > 8]
            chosen = set(others[:math.ceil(density * len(others))])
            seen = [j for j in range(i + 1) if block[i] == blocks - 1 or block[j] in chosen or block[j] == 0
                    or block[i] - block[j] <= 8]
            probs = ((q[h, i] @ keys[seen].T).float() * scale).softmax(-1)
            out[h, i] = (probs @ values[seen].float()).to(out.dtype)
    return out


def test_sparse_attention_matches_the_specification_for_each_row_of_a_padded_batch():
    torch.manual_seed(0)
    lengths, seq, density = [LONG, 1100], LONG, 0.2
    q, k, v = torch.randn(2, 4, seq, 16), torch.randn(2, 2, seq, 16), torch.randn(2, 2, seq, 16)
    sparse = SparsePrompt.of(density, lengths, seq, q.device)
    out, _ = prefill_attention(None, q, k, v, None, scaling=0.25, dash_sparse=sparse)  # (batch, seq, heads, dim)
    for row, length in enumerate(lengths):
        real = slice(seq - length, seq)
        expected = spec_attention(q[row, :, real], k[row, :, real], v[row, :, real], length, density, 0.25)
        # FlexAttention's compiled GPU kernel multiplies float32 in TF32.
        tolerance = dict(atol=2e-3, rtol=1e-3) if q.is_cuda else dict(atol=1e-5, rtol=1e-4)
        assert_close(out[row, real].transpose(0, 1), expected, **tolerance)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flexattention_and_the_gathered_kernel_compute_the_same_attention():
    torch.manual_seed(1)
    seq = LONG
    q, k, v = torch.randn(2, 4, seq, 16), torch.randn(2, 2, seq, 16), torch.randn(2, 2, seq, 16)
    start = torch.tensor([0, 300])
    pad, _ = grid(seq)
    real = torch.arange(seq)[None] >= start[:, None]
    keep = select_blocks(block_estimate(q[:, :, -BLOCK:], k, 0.25, real), (start + pad) // BLOCK, 0.3)
    assert not keep[:, :, -2].all()  # some block is skipped
    gathered = gathered_attention(q, k, v, keep, start, 0.25)
    flex = flex_attention(q, k, v, keep, start, 0.25, compiled=False)
    assert_close(flex[0], gathered[0], atol=1e-5, rtol=1e-4)
    assert_close(flex[1, :, 300:], gathered[1, :, 300:], atol=1e-5, rtol=1e-4)  # padding rows are unused


def compiled_against_gathered(seq: int, dim: int, scale: float) -> None:
    torch.manual_seed(seq)
    q, k, v = torch.randn(1, 2, seq, dim), torch.randn(1, 1, seq, dim), torch.randn(1, 1, seq, dim)
    start = torch.tensor([0])
    keep = select_blocks(block_estimate(q[:, :, -BLOCK:], k, scale, torch.ones(1, seq, dtype=torch.bool)),
                         start // BLOCK, 0.3)
    compiled = flex_attention(q, k, v, keep, start, scale, compiled=True)
    assert_close(compiled, gathered_attention(q, k, v, keep, start, scale), atol=1e-5, rtol=1e-4)


def test_compiled_flexattention_serves_many_prompt_lengths_with_two_compilations():
    """A server sees a new length per prompt: one compilation per length would soon exhaust the
    compiled entries (and dynamo would fall back to the unfused path, which holds the whole score
    matrix: tens of GB at 32K)."""
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["frames"]["ok"]
    for seq in (1300, 1500, 1700, 2100):  # four 128-token grids
        compiled_against_gathered(seq, 16, 0.25)
    assert torch._dynamo.utils.counters["frames"]["ok"] - before <= 2
    torch._dynamo.reset()


@torch._dynamo.config.patch(recompile_limit=1)
def test_compiled_flexattention_compiles_past_dynamos_limit_and_says_when_it_must_stop(monkeypatch):
    """Each model (scaling, head size) compiles its own entry: past dynamo's limit the compiled
    function would silently fall back to the unfused path, which syncs and holds the whole score
    matrix; up to FLEX_VARIANTS it compiles, past them it is one clear error."""
    monkeypatch.setattr("dash_prefill.hf.attention.FLEX_VARIANTS", 3)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["frames"]["ok"]
    # three models, past dynamo's limit of 1 here (head sizes >= 16: the GPU's flex kernel needs them)
    for dim, scale in ((16, 0.25), (64, 0.35), (32, 0.2)):
        compiled_against_gathered(1300, dim, scale)
    assert torch._dynamo.utils.counters["frames"]["ok"] - before == 3
    with pytest.raises(RuntimeError, match=r"compiled FlexAttention for 3 variants .* torch._dynamo.reset\(\)"):
        compiled_against_gathered(1300, 16, 0.3)
    torch._dynamo.reset()


def test_selected_blocks_are_causal_and_hold_the_sink_the_local_band_and_the_question():
    torch.manual_seed(2)
    estimate = torch.rand(2, 3, 20)
    first = torch.tensor([0, 5])
    keep = select_blocks(estimate, first, 0.4)
    q, kk = torch.arange(20)[:, None], torch.arange(20)[None, :]
    assert not (keep & (kk > q)).any()
    assert not keep[1, :, :, :5].any(dim=-1)[..., 6:].any()  # no block before a row's first
    assert keep[:, :, 19, :].sum(-1).tolist() == [[20] * 3, [15] * 3]  # the question sees every block
    assert keep[0, :, 15, 0].all() and keep[1, :, 15, 5].all()  # the sink
    assert keep[:, :, 15, 7:16].all()  # the local band and the diagonal
    # Beyond the sink and the band, query block 18 keeps ceil(0.4 x its other blocks), the top-ranked
    # of those it can see: row 0 4 of blocks 1-9, row 1 (first block 5) 2 of blocks 6-9.
    for h in range(3):
        top0 = set((estimate[0, h, 1:10].argsort(descending=True)[:4] + 1).tolist())
        top1 = set((estimate[1, h, 6:10].argsort(descending=True)[:2] + 6).tolist())
        assert [bool(keep[0, h, 18, k]) for k in range(1, 10)] == [k in top0 for k in range(1, 10)]
        assert [bool(keep[1, h, 18, k]) for k in range(6, 10)] == [k in top1 for k in range(6, 10)]
    # A block the ranking puts first but a query block cannot see takes nothing from its budget.
    late = torch.zeros(1, 1, 20)
    late[0, 0, 17], late[0, 0, 3] = 2.0, 1.0
    assert select_blocks(late, torch.tensor([0]), 0.1)[0, 0, 12, 3]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "mistral"])
def test_a_left_padded_row_gets_with_sparse_attention_what_it_gets_alone(family):
    model = long_model(family)
    lengths = [LONG, 1100]
    rows = [random_ids(1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.stack([torch.cat([torch.zeros(LONG - len(r), dtype=torch.long), r]) for r in rows])
    mask = (torch.arange(LONG)[None] >= torch.tensor([LONG - n for n in lengths])[:, None]).long()
    for label in ("plain~0.2", "attention@0.5/s2/p3~0.2", "attention@0.1/s1/p3~0.2/0.2",
                  "attention@0.1/s1/p3+0.2/s2~1.0/0.3"):
        config = DashConfig.from_label(label)
        batch = prefill(model, ids, config, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = prefill(model, row[None], config)
            assert torch.equal(batch.active_mask[i, LONG - len(row):], alone.active_mask[0]), label
            assert_close(batch.logits[i], alone.logits[0], atol=5e-5, rtol=1e-4)


def test_filler_slots_lead_each_row_at_its_left_padding():
    """Rows of a padded batch keep different counts; the slots they do not fill are their first,
    at padding positions, so past a gate a row's kept tokens end the row as when it runs alone."""
    torch.manual_seed(6)
    lengths, seq = [300, 200, 120], 300
    eligibility = Eligibility.of_prompt(lengths, seq, 0.5, 4, 16, device=torch.zeros(0).device)
    selection = eligibility.select(torch.rand(3, seq))
    width = max(eligibility.kept)
    for row, (length, kept) in enumerate(zip(lengths, eligibility.kept)):
        assert selection.filled[row].tolist() == [False] * (width - kept) + [True] * kept
        assert (selection.index[row, :width - kept] < seq - length).all()  # padding
        assert (selection.index[row, width - kept:] >= seq - length).all()
        assert (selection.index[row].diff() > 0).all()


def test_sparse_attention_after_a_gate_matches_the_specification_for_each_row_of_a_padded_batch():
    torch.manual_seed(7)
    lengths, density = [LATER, 2000], 0.2
    eligibility = Eligibility.of_prompt(lengths, LATER, 0.2, 4, 64, device=torch.zeros(0).device)
    selection = eligibility.select(torch.rand(2, LATER))
    width = max(eligibility.kept)
    q, k, v = torch.randn(2, 4, width, 16), torch.randn(2, 2, width, 16), torch.randn(2, 2, width, 16)
    out, _ = prefill_attention(None, q, k, v, None, scaling=0.25, dash_sparse=later_sparse(density, selection))
    for row, kept in enumerate(eligibility.kept):
        real = slice(width - kept, width)
        expected = spec_attention(q[row, :, real], k[row, :, real], v[row, :, real], kept, density, 0.25)
        tolerance = dict(atol=2e-3, rtol=1e-3) if q.is_cuda else dict(atol=1e-5, rtol=1e-4)
        assert_close(out[row, real].transpose(0, 1), expected, **tolerance)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sparse_attention_after_the_gate_changes_only_the_layers_after_it(family):
    model = long_model(family)
    ids = random_ids(1, LATER, seed=8)
    dense = prefill(model, ids, DashConfig.from_label("attention@0.2/s1/p3"))
    config = DashConfig.from_label("attention@0.2/s1/p3~1.0/0.1")
    sparse = prefill(model, ids, config)
    assert torch.equal(sparse.active_mask, dense.active_mask)  # the gate ranks what dense attention gave it
    for layer in (0, 1):  # before the gate and the gate itself are dense
        assert torch.equal(sparse.cache.layers[layer].keys, dense.cache.layers[layer].keys)
    assert not torch.allclose(sparse.logits, dense.logits)  # layer 2 attends fewer blocks
    kept = sparse.stats.kept_tokens[0] / LATER
    assert sparse.stats.ideal_speedup == ideal_speedup(model.config, LATER, 1, kept, later_density=0.1)
    assert sparse.stats.ideal_speedup > dense.stats.ideal_speedup


def test_a_sliding_window_layer_after_the_gate_stays_dense():
    """Past a gate a window spans original positions, not kept tokens: with a window (2600) longer
    than the kept tokens (2400) but shorter than what they span (3000), Mistral's layers (all
    sliding) run dense attention under the window's mask, so the later density changes nothing."""
    model_class, make_config = FAMILIES["mistral"]
    config = make_config()
    config.sliding_window, config.max_position_embeddings, config._attn_implementation = 2600, 4096, "sdpa"
    torch.manual_seed(0)
    model = model_class(config).eval()
    ids = random_ids(1, LATER, seed=9)
    dense = prefill(model, ids, DashConfig.from_label("attention@0.2/s1/p3"))
    sparse = prefill(model, ids, DashConfig.from_label("attention@0.2/s1/p3~1.0/0.1"))
    assert torch.equal(sparse.logits, dense.logits)


def test_sparse_attention_changes_the_prefill_and_density_one_is_the_dense_prefill():
    model = long_model("llama")
    ids = random_ids(1, LONG, seed=3)
    dense = prefill(model, ids, DashConfig.from_label("plain"))
    assert DashConfig.from_label("plain~1.0") == DashConfig.from_label("plain")
    sparse = prefill(model, ids, DashConfig.from_label("plain~0.1"))
    # Keys of the last layer at early positions differ: the layers before it attended fewer blocks.
    early = slice(BLOCK * 9, BLOCK * 10)
    assert not torch.allclose(sparse.cache.layers[-1].keys[:, :, early], dense.cache.layers[-1].keys[:, :, early])
    # The first layer's keys come before any attention: equal.
    assert torch.equal(sparse.cache.layers[0].keys, dense.cache.layers[0].keys)
    assert sparse.stats.ideal_speedup > 1.0 == dense.stats.ideal_speedup


def test_branches_with_several_densities_equal_one_prefill_each():
    model = long_model("qwen2")
    ids = random_ids(1, LONG, seed=4)
    configs = [DashConfig.from_label(label) for label in
               ("plain", "dash@0.5/s2~0.2", "attention@0.5/s1~0.2", "plain~0.3", "dash@0.5/s2")]
    for config, branch in zip(configs, prefill_branches(model, ids, configs)):
        alone = prefill(model, ids, config)
        assert torch.equal(branch.active_mask, alone.active_mask), config.label
        assert_close(branch.logits, alone.logits, atol=1e-5, rtol=1e-5)
        assert branch.stats.ideal_speedup == alone.stats.ideal_speedup


def test_decoding_after_a_sparse_prefill_reads_the_whole_cache():
    model = long_model("llama")
    ids = random_ids(1, LONG, seed=5)
    result = prefill(model, ids, DashConfig.from_label("dash@0.5/s2~0.2"))
    assert result.cache.layers[0].keys.shape[2] == LONG  # layers before the gate cache every token
    logits = decode_step(model, result, result.logits.argmax(-1)[:, None])
    assert torch.isfinite(logits).all()
    assert result.cache.layers[0].keys.shape[2] == LONG + 1


@pytest.mark.parametrize("label", ["plain~0.5", "attention@0.2/s1~1.0/0.5"])
def test_sparse_attention_refuses_gemma3_image_blocks_it_would_attend_causally(label):
    """Block-sparse attention ignores the mask, where an image's bidirectional block lives."""
    model = build_vlm("gemma3")
    inputs = dict(vlm_inputs(model, text_before=6, text_after=3))
    ids = inputs.pop("input_ids")
    field = "later_density" if "/" in label.split("~")[1] else "density"
    with pytest.raises(ValueError, match=f"{field} < 1 .* does not support Gemma-3 image blocks"):
        prefill(model, ids, DashConfig.from_label(label), **inputs)


def test_sparse_attention_needs_sdpa_and_says_so():
    model = long_model("llama", "eager")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        prefill(model, random_ids(1, 300), DashConfig.from_label("plain~0.2"))


def test_the_cost_model_counts_the_kept_block_pairs():
    assert sparse_fraction(131072, 1.0) == 1.0
    fractions = [sparse_fraction(131072, d) for d in (0.05, 0.1, 0.3)]
    assert fractions == sorted(fractions)
    assert 0.1 < fractions[1] < 0.13  # density plus the band, the sink and the question
    assert sparse_fraction(1000, 0.1) == 1.0 or sparse_fraction(1000, 0.1) > 0.9  # short: the band is all
    config = build_model("llama").config
    one_gate = ideal_speedup(config, 131072, 2, 0.5)
    assert ideal_speedup(config, 131072, 2, 0.5, density=0.1) > one_gate
    assert ideal_speedup(config, 131072, 4, 1.0, density=0.1) > 5  # all layers sparse, attention-bound
    assert ideal_speedup(config, 131072, 1, 0.5, later_density=0.1) > ideal_speedup(config, 131072, 1, 0.5)
    assert ideal_speedup(config, 131072, 3, 0.5, later_density=0.1) == ideal_speedup(config, 131072, 3, 0.5)  # the gate is last



@pytest.mark.parametrize("blocks, density", [(64, 0.1), (256, 0.05), (40, 0.3)])
def test_the_cost_models_kept_fraction_is_what_the_selection_keeps(blocks, density):
    torch.manual_seed(blocks)
    estimate = torch.rand(1, 16, blocks)
    keep = select_blocks(estimate, torch.tensor([0]), density)
    kept = keep.float().sum(dim=(-1, -2)).mean().item() / (blocks * (blocks + 1) / 2)
    assert kept == pytest.approx(sparse_fraction(blocks * BLOCK, density), rel=1e-9)

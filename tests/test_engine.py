"""The engine against the model's own forward pass and against the slow reference."""

import pytest
import torch
from torch.testing import assert_close

from conftest import FAMILIES, build_model, random_ids
from dash_prefill import DashConfig, decode_step, prefill
from dash_prefill.core.cost import ideal_speedup
from dash_prefill.core.policy import POLICIES
from reference import attention_at, reference_forward, start_layer_scores, top_tokens, update_norms
from reference import policy_scores as reference_policy_scores

SEQ = 40


def _window_keep(model, layer):
    """Entries a layer's cache keeps at most: window - 1 on sliding layers (as HF), else all."""
    window = getattr(model.config, "sliding_window", None)
    types = getattr(model.config, "layer_types", None)
    if window is None or (types and types[layer] != "sliding_attention"):
        return None
    return window - 1


def _kept_index(result):
    """(batch, kept) original indices of the tokens computed past the last gate, for rows that
    keep the same number of tokens."""
    return result.active_mask.nonzero()[:, 1].view(result.active_mask.shape[0], -1)


def _tail(tensor, count, dim):
    return tensor if count is None else tensor.narrow(dim, max(0, tensor.shape[dim] - count),
                                                       min(count, tensor.shape[dim]))


@pytest.mark.parametrize("policy", ["dash", "none"])
def test_zero_ratio_matches_plain_forward(family, implementation, policy):
    model = build_model(family, implementation)
    ids = random_ids(2, SEQ)
    expected = model(ids, use_cache=True)
    result = prefill(model, ids, DashConfig(halt_ratio=0.0, policy=policy))
    assert_close(result.logits, expected.logits[:, -1].float())
    for layer, (ours, theirs) in enumerate(zip(result.cache.layers, expected.past_key_values.layers)):
        # Sliding-window layers keep only the last window - 1 keys, as in HF's own cache.
        assert ours.keys.shape == theirs.keys.shape
        assert_close(ours.keys, theirs.keys, msg=f"keys of layer {layer}")
        assert_close(ours.values, theirs.values, msg=f"values of layer {layer}")


@pytest.mark.parametrize("policy, pool", [("dash", 1), ("random", 1), ("dash", 5), ("attention", 3),
                                          ("contribution", 1), ("dash-question", 3)])
def test_halting_matches_masked_reference(family, implementation, policy, pool):
    model = build_model(family, implementation)
    ids = random_ids(2, SEQ)
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_first=2, protect_last=3, policy=policy,
                        pool=pool)
    result = prefill(model, ids, config)
    active = result.active_mask
    logits, cache = reference_forward(model, ids, start_layer=1, active=active)
    assert_close(result.logits, logits)
    for layer in range(1, len(model.model.layers)):
        index = _kept_index(result)[:, None, :, None]
        for name in ("keys", "values"):
            theirs = getattr(cache.layers[layer], name)
            kept = theirs.gather(2, index.expand(-1, theirs.shape[1], -1, theirs.shape[3]))
            kept = _tail(kept, _window_keep(model, layer), 2)
            assert_close(getattr(result.cache.layers[layer], name), kept, msg=f"{name} of layer {layer}")


def test_cache_after_start_layer_holds_exactly_the_kept_tokens_in_order(family):
    model = build_model(family)
    ids = random_ids(1, SEQ)
    result = prefill(model, ids, DashConfig(halt_ratio=0.5, start_layer=2, protect_first=1, protect_last=1))
    kept = SEQ - int(0.5 * SEQ)
    assert _kept_index(result).shape == (1, kept)
    for layer, entry in enumerate(result.cache.layers):
        expected = torch.arange(SEQ) if layer < 2 else _kept_index(result)[0]
        expected = _tail(expected, _window_keep(model, layer), 0)
        assert entry.keys.shape[2] == len(expected)
        assert torch.equal(result.key_layouts[layer].positions[0], expected)
    assert result.stats.kv_tokens_per_layer == [entry.keys.shape[2] for entry in result.cache.layers]


def _start_layer_tensors(model, ids, layer_index):
    """HF forward; returns the start layer's input h and its attention module's output."""
    captured = {}
    layer = model.model.layers[layer_index]
    handles = [
        layer.register_forward_pre_hook(lambda module, args, kwargs: captured.update(h=args[0]),
                                        with_kwargs=True),
        layer.self_attn.register_forward_hook(lambda module, args, output: captured.update(u=output[0])),
    ]
    model(ids)
    for handle in handles:
        handle.remove()
    return captured["h"][0], captured["u"][0]


def test_dash_halts_the_tokens_with_the_smallest_attention_update(family):
    # U is the attention output after o_proj; for Gemma-3, before its post-attention norm.
    model = build_model(family)
    ids = random_ids(1, SEQ)
    norms = _start_layer_tensors(model, ids, 2)[1].norm(dim=-1)
    result = prefill(model, ids, DashConfig(halt_ratio=0.25, start_layer=2, protect_first=0, protect_last=1))
    kept = SEQ - int(0.25 * SEQ)
    expected = norms[:-1].topk(kept - 1).indices.tolist() + [SEQ - 1]
    assert sorted(expected) == _kept_index(result)[0].tolist()
    assert_close(result.scores[0], norms)


def test_relative_score_divides_by_the_residual_norm(family):
    model = build_model(family)
    ids = random_ids(1, SEQ)
    hidden, update = _start_layer_tensors(model, ids, 2)
    result = prefill(model, ids, DashConfig(halt_ratio=0.5, start_layer=2, score="relative"))
    assert_close(result.scores[0], update.norm(dim=-1) / hidden.norm(dim=-1))


@pytest.mark.parametrize("gates", [
    dict(),
    dict(pool=3, pool_offset=1, later_gates=((2, 0.75),)),  # two gates, a shifted span, filler slots
], ids=["one-gate", "two-gates-pooled"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_left_padded_row_keeps_the_tokens_and_logits_it_has_alone(family, policy, gates):
    model = build_model(family)
    lengths = [SEQ, 29, 17]
    rows = [random_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.stack([torch.cat([torch.zeros(SEQ - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(SEQ - len(r)), torch.ones(len(r))]).long() for r in rows])
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_first=2, protect_last=2, policy=policy, **gates)
    final = config.later_gates[-1][1] if config.later_gates else 0.5
    batch = prefill(model, ids, config, attention_mask=mask)
    next_token = batch.logits.argmax(-1)
    batch_step = decode_step(model, batch, next_token[:, None])
    for i, row in enumerate(rows):
        alone = prefill(model, row[None], config)
        assert batch.stats.kept_tokens[i] == alone.stats.kept_tokens[0] == len(row) - int(final * len(row))
        assert not batch.active_mask[i, :SEQ - len(row)].any()
        assert torch.equal(batch.active_mask[i, SEQ - len(row):], alone.active_mask[0]), f"row {i}"
        assert_close(batch.logits[i], alone.logits[0], atol=2e-5, rtol=1e-4)
        alone_step = decode_step(model, alone, next_token[i, None, None])
        assert_close(batch_step[i], alone_step[0], atol=2e-5, rtol=1e-4)


def test_active_mask_of_a_short_row_lists_exactly_its_kept_tokens():
    # 97 tokens next to 160 at rho=0.5: the short row keeps 49 of the 80 compacted slots; the
    # other 31 are filler (computed, never attended to) and not active.
    model = build_model("llama")
    long, short = random_ids(1, 160, seed=5)[0], random_ids(1, 97, seed=6)[0]
    ids = torch.stack([long, torch.cat([torch.zeros(63, dtype=torch.long), short])])
    mask = (torch.arange(160)[None] >= torch.tensor([0, 63])[:, None]).long()
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_first=2, protect_last=3)
    result = prefill(model, ids, config, attention_mask=mask)
    assert result.stats.kept_tokens == [80, 49]
    assert result.active_mask.sum(-1).tolist() == [80, 49]
    assert not result.active_mask[1, :63].any()
    assert torch.equal(result.active_mask[1, 63:], prefill(model, short[None], config).active_mask[0])


def test_decoding_after_halting_matches_reference_with_the_new_token_active(family, implementation):
    model = build_model(family, implementation)
    ids = random_ids(1, SEQ)
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_first=2, protect_last=2)
    result = prefill(model, ids, config)
    token = result.logits.argmax(-1)
    logits = decode_step(model, result, token[:, None])
    active = torch.cat([result.active_mask, torch.ones(1, 1, dtype=torch.bool)], dim=1)
    expected, _ = reference_forward(model, torch.cat([ids, token[:, None]], 1), start_layer=1, active=active,
                                   prompt_len=SEQ)
    assert_close(logits, expected)
    assert result.next_positions.tolist() == [SEQ + 1]


def test_bfloat16_prefill_stays_close_to_float32():
    ids = random_ids(1, SEQ)
    config = DashConfig(halt_ratio=0.0)
    full = prefill(build_model("llama"), ids, config).logits
    half = prefill(build_model("llama", dtype=torch.bfloat16), ids, config).logits
    assert half.dtype == torch.float32
    assert torch.corrcoef(torch.stack([full[0], half[0]]))[0, 1] > 0.99


def test_every_family_is_covered_by_the_tiny_models():
    from dash_prefill.hf.adapters import ADAPTERS
    types = {FAMILIES[f][1]().model_type for f in FAMILIES}
    assert types == set(ADAPTERS)


@pytest.mark.parametrize("policy", ["attention", "contribution"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "phi3", "gemma3"])
def test_attention_policies_score_the_attention_the_model_computes_at_the_gate_layer(family, policy):
    # Gate layer 1 slides over 12 (Mistral) or 8 (Gemma-3) of the 40 tokens: keys further back
    # than the window get no attention from the model, and none in the scores.
    model = build_model(family, "eager")
    ids = random_ids(1, SEQ)
    seen = attention_at(model, ids, 1)
    received = seen["weights"][0, :, -5:].mean(dim=1)  # (heads, seq), HF's own probabilities
    keep = _window_keep(model, 1)  # window - 1 on a sliding layer
    if keep is not None:  # the window bites: the first question query sees back to SEQ - 5 - keep
        assert (received[:, :SEQ - 5 - keep] == 0).all() and (received[:, SEQ - 5 - keep] > 0).all()
    values = seen["values"][0].norm(dim=-1).repeat_interleave(received.shape[0] // seen["values"].shape[1], dim=0)
    expected = received.mean(0) if policy == "attention" else (received * values).sum(0)
    result = prefill(model, ids, DashConfig(halt_ratio=0.5, start_layer=1, protect_last=5, policy=policy))
    assert_close(result.scores[0], expected, atol=1e-5, rtol=1e-4)
    assert result.stats.kept_tokens == [SEQ // 2]


@pytest.mark.parametrize("policy", list(POLICIES))
def test_each_policy_keeps_the_tokens_its_scores_from_the_models_own_forward_select(family, policy):
    """The kept set against an independent computation: each policy's scores written out from
    HF's eager forward with every token (``reference.policy_scores``, which raises for a
    policy it does not know), the top tokens chosen by hand (``reference.top_tokens``)."""
    model = build_model(family, "eager")
    ids = random_ids(2, SEQ)
    scores = reference_policy_scores(model, ids, 1, policy, question=5, seed=3)
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_first=2, protect_last=5, policy=policy, seed=3)
    result = prefill(model, ids, config)
    assert_close(result.scores, scores, atol=1e-5, rtol=1e-4)
    assert torch.equal(result.active_mask, top_tokens(scores, 0.5, 2, 5))


def test_each_sliding_layer_records_its_own_keys_even_where_object_ids_repeat(monkeypatch):
    # A freed layout's id() can be given to a new one. Every id() made equal stands for that:
    # the layers after each of three gates must still record the keys their caches hold.
    import dash_prefill.hf.prefill as engine
    model = build_model("gemma3")  # layers 0, 1 and 3 slide over 8 tokens
    ids = random_ids(1, SEQ)
    config = DashConfig(halt_ratio=0.25, start_layer=1, protect_first=1, protect_last=2,
                        later_gates=((2, 0.5), (3, 0.75)))
    expected = [layout.positions for layout in prefill(model, ids, config).key_layouts]
    monkeypatch.setattr(engine, "id", lambda obj: 0, raising=False)
    result = prefill(model, ids, config)
    assert [layout.positions.tolist() for layout in result.key_layouts] == [p.tolist() for p in expected]
    assert torch.equal(expected[3][0], _kept_index(result)[0, -7:])  # the last gate's survivors


def test_pooled_scores_are_the_sliding_maximum_of_the_unpooled_ones(family):
    model = build_model(family)
    ids = random_ids(1, SEQ)
    raw = prefill(model, ids, DashConfig(halt_ratio=0.5, start_layer=2, protect_last=4)).scores[0]
    pooled = prefill(model, ids, DashConfig(halt_ratio=0.5, start_layer=2, protect_last=4, pool=5)).scores[0]
    expected = torch.stack([raw[max(0, t - 2):t + 3].max() for t in range(SEQ)])
    assert_close(pooled, expected)
    shifted = prefill(model, ids, DashConfig(halt_ratio=0.5, start_layer=2, protect_last=4, pool=5,
                                             pool_offset=2)).scores[0]
    assert_close(shifted, torch.stack([raw[max(0, t - 4):t + 1].max() for t in range(SEQ)]))


def test_branches_sharing_the_trunk_equal_separate_prefills():
    from dash_prefill import prefill_branches
    model = build_model("gemma3")
    ids = random_ids(1, SEQ)
    configs = [DashConfig(policy="none"), DashConfig(halt_ratio=0.5, start_layer=2, protect_last=2),
               DashConfig(halt_ratio=0.25, start_layer=1, protect_last=2, policy="random"),
               DashConfig(halt_ratio=0.5, start_layer=2, score="relative", protect_last=2)]
    for config, branch in zip(configs, prefill_branches(model, ids, configs)):
        alone = prefill(model, ids, config)
        assert_close(branch.logits, alone.logits)
        token = alone.logits.argmax(-1)[:, None]
        assert_close(decode_step(model, branch, token), decode_step(model, alone, token))


def test_accelerate_dispatched_model_gives_the_same_prefill_and_decoding():
    # Layers sharded by accelerate (device_map="auto") carry device-alignment hooks; with one
    # device available, attach the same hooks dispatch_model would and check nothing changes.
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    ids = random_ids(1, SEQ)
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_last=2)
    expected = prefill(build_model("gemma3"), ids, config)
    sharded = build_model("gemma3")
    for module in [sharded.model.embed_tokens, *sharded.model.layers, sharded.model.norm, sharded.lm_head]:
        add_hook_to_module(module, AlignDevicesHook(execution_device=ids.device, io_same_device=True))
    result = prefill(sharded, ids, config)
    assert_close(result.logits, expected.logits)
    token = expected.logits.argmax(-1)[:, None]
    assert_close(decode_step(sharded, result, token), decode_step(build_model("gemma3"), expected, token))


@pytest.mark.parametrize("padded", [False, True])
def test_teacher_forced_tokens_give_the_logits_of_decoding_them_one_by_one(family, padded):
    from dash_prefill.hf.decode import extend
    model = build_model(family)
    ids = random_ids(2, SEQ)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :7] = 0
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_first=2, protect_last=3)
    follow = random_ids(2, 5, seed=3)
    forced = extend(model, prefill(model, ids, config, attention_mask=mask), follow)
    state = prefill(model, ids, config, attention_mask=mask)
    stepped = torch.stack([decode_step(model, state, follow[:, i:i + 1]) for i in range(5)], dim=1)
    assert forced.shape == (2, 5, model.config.vocab_size)
    assert_close(forced, stepped, atol=2e-5, rtol=1e-4)


def test_a_later_gate_halts_more_of_the_survivors_exactly_as_the_masked_reference(family, implementation):
    """Two gates: DASH at layer 1 keeps 60%, then ||U|| at layer 2 (of the masked forward, so
    computed without the engine) keeps 30% of the prompt; logits, survivors and the decoded
    token's logits equal the masked reference with those two active sets."""
    model = build_model(family, implementation)
    ids = random_ids(2, SEQ)
    config = DashConfig(halt_ratio=0.4, start_layer=1, protect_first=2, protect_last=3, later_gates=((2, 0.7),))
    first = top_tokens(start_layer_scores(model, ids, 1), 0.4, 2, 3)
    norms = update_norms(model, ids, 2, 1, first).masked_fill(~first, float("-inf"))
    second = top_tokens(norms, 0.7, 2, 3)
    assert (second <= first).all() and second.sum(-1).tolist() == [SEQ - int(0.7 * SEQ)] * 2
    result = prefill(model, ids, config)
    assert_close(result.active_mask, second)
    expected, _ = reference_forward(model, ids, 1, first, later_gates=((2, second),))
    assert_close(result.logits, expected)
    kept = [SEQ, SEQ - int(0.4 * SEQ), SEQ - int(0.7 * SEQ)]  # entries before, at and after the gates
    assert result.stats.kept_tokens == [kept[2]] * 2 and result.stats.start_layer == 1
    assert result.stats.ideal_speedup == ideal_speedup(model.config, SEQ, 1, kept[1] / SEQ,
                                                       later_gates=[(2, kept[2] / SEQ)])
    for layer, cached in enumerate(result.cache.layers):
        if _window_keep(model, layer) is None:
            assert cached.keys.shape[2] == kept[min(layer, 2)], f"layer {layer}"
    token = result.logits.argmax(-1)[:, None]
    logits = decode_step(model, result, token)
    new = torch.ones(2, 1, dtype=torch.bool)
    decoded, _ = reference_forward(model, torch.cat([ids, token], 1), 1, torch.cat([first, new], 1),
                                   prompt_len=SEQ, later_gates=((2, torch.cat([second, new], 1)),))
    assert_close(logits, decoded)

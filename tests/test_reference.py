"""The slow reference itself: with every token active it must equal the model's own forward,
or it could share a bug with the engine instead of catching it."""

import torch
from torch.testing import assert_close

from conftest import build_model, random_ids
from reference import reference_forward, start_layer_scores, top_tokens
from vlms import build_vlm, vlm_inputs

GRIDS = ((1, 4, 4), (1, 4, 6))


def test_reference_with_every_token_active_matches_the_models_forward(family, implementation):
    model = build_model(family, implementation)
    ids = random_ids(2, 40)
    expected = model(ids).logits[:, -1].float()
    logits, _ = reference_forward(model, ids, start_layer=1, active=torch.ones(2, 40, dtype=torch.bool))
    assert_close(logits, expected)


def test_reference_with_every_token_active_matches_the_vlms_forward(one_thread):
    for family in ("llava", "qwen2_vl", "qwen2_5_vl", "gemma3"):
        model = build_vlm(family)
        inputs = vlm_inputs(model, images=2, grids=GRIDS)
        ids = inputs.pop("input_ids")
        with torch.no_grad():
            expected = model(input_ids=ids, **inputs).logits[:, -1].float()
        active = torch.ones(ids.shape, dtype=torch.bool)
        logits, _ = reference_forward(model, ids, start_layer=1, active=active, **inputs)
        assert_close(logits, expected, atol=1e-5, rtol=1e-5, msg=family)


def test_written_out_selection_keeps_protected_tokens_and_the_best_scores():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.2, 0.8, 0.3, 0.05, 0.4]])
    # 8 tokens, rho 0.5: 4 halt; token 0 and the last token are protected.
    active = top_tokens(scores, 0.5, protect_first=1, protect_last=1)
    assert active[0].tolist() == [True, False, True, False, True, False, False, True]
    # Only tokens 2..5 may halt: floor(0.5 * 4) = 2 of them halt (the two smallest, 3 and 5).
    may_halt = torch.tensor([[False, False, True, True, True, True, False, False]])
    active = top_tokens(scores, 0.5, protect_first=0, protect_last=1, may_halt=may_halt)
    assert active[0].tolist() == [True, True, True, False, True, False, True, True]


def test_start_layer_scores_are_the_attention_module_output_norms():
    model = build_model("llama")
    ids = random_ids(1, 12)
    captured = {}
    handle = model.model.layers[2].self_attn.register_forward_hook(
        lambda module, args, output: captured.update(u=output[0]))
    model(ids)
    handle.remove()
    assert_close(start_layer_scores(model, ids, 2), captured["u"].norm(dim=-1))

"""Decoder-side DASH on vision-language models: tiny random Llava, Qwen2-VL, Qwen2.5-VL and
Gemma-3 (multimodal) against Hugging Face's own forward and the slow masked reference."""

import pytest
import torch

from dash_prefill import DashConfig
from dash_prefill.hf.adapters import adapter_for
from dash_prefill import decode_step, prefill
from dash_prefill.hf.multimodal import prompt_inputs
from reference import reference_forward, start_layer_scores, top_tokens
from vlms import BUILDERS, IMAGE_TOKEN, build_vlm, vlm_inputs

GRIDS = ((1, 4, 4), (1, 4, 6))  # Qwen: two images of different sizes


@pytest.fixture(params=list(BUILDERS))
def vlm(request):
    return request.param


def _split(inputs):
    inputs = dict(inputs)
    return inputs.pop("input_ids"), inputs


def test_rho_zero_matches_hf_forward_with_two_images(vlm, one_thread):
    model = build_vlm(vlm)
    ids, extra = _split(vlm_inputs(model, images=2, grids=GRIDS))
    with torch.no_grad():
        expected = model(input_ids=ids, **extra).logits[:, -1].float()
    result = prefill(model, ids, DashConfig(halt_ratio=0.0), **extra)
    torch.testing.assert_close(result.logits, expected, atol=1e-5, rtol=1e-5)


def test_decoded_logits_at_rho_zero_match_hf_forward_over_prompt_and_generated_tokens(vlm, one_thread):
    # Generated tokens must continue at the right rotary position (M-RoPE: after the largest).
    model = build_vlm(vlm)
    ids, extra = _split(vlm_inputs(model, images=2, grids=GRIDS))
    state = prefill(model, ids, DashConfig(halt_ratio=0.0), **extra)
    generated = torch.tensor([[5, 17, 42, 9]])
    ours = [decode_step(model, state, generated[:, i:i + 1]) for i in range(generated.shape[1])]
    full = torch.cat([ids, generated], dim=1)
    longer = {k: torch.cat([v, torch.zeros_like(generated)], dim=1) if k.endswith("type_ids") else v
              for k, v in extra.items()}
    with torch.no_grad():
        expected = model(input_ids=full, **longer).logits[0, ids.shape[1]:].float()
    torch.testing.assert_close(torch.cat(ours), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eligible", ["all", "image"])
def test_halted_prefill_matches_masked_reference_at_original_rope_positions(vlm, eligible, one_thread):
    # The active set comes from HF's own forward (||U|| at the start layer) and a selection
    # written out in the test, not from the engine; the engine must choose the same one.
    model = build_vlm(vlm)
    ids, extra = _split(vlm_inputs(model, images=2, grids=GRIDS))
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_first=2, protect_last=3, eligible=eligible)
    scores = start_layer_scores(model, ids, 1, **extra)
    active = top_tokens(scores, 0.5, 2, 3, may_halt=(ids == IMAGE_TOKEN) if eligible == "image" else None)
    result = prefill(model, ids, config, **extra)
    assert torch.equal(result.active_mask, active)
    expected, _ = reference_forward(model, ids, 1, active, **extra)
    torch.testing.assert_close(result.logits, expected, atol=1e-4, rtol=1e-4)


def test_image_eligibility_never_halts_text_and_halts_rho_of_the_image_tokens(vlm, one_thread):
    model = build_vlm(vlm)
    ids, extra = _split(vlm_inputs(model, images=2, grids=GRIDS))
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_first=0, protect_last=0, eligible="image")
    result = prefill(model, ids, config, **extra)
    active = result.active_mask[0]
    image = ids[0] == IMAGE_TOKEN
    assert active[~image].all()
    assert int((~active).sum()) == int(0.5 * int(image.sum()))


def test_each_row_of_a_batch_halts_as_it_would_alone(vlm, one_thread):
    model = build_vlm(vlm)
    ids, extra = _split(vlm_inputs(model, images=2, grids=GRIDS, batch=2))
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_first=2, protect_last=3)
    together = prefill(model, ids, config, **extra)
    alone_ids, alone_extra = _split(vlm_inputs(model, images=2, grids=GRIDS, batch=1))
    assert torch.equal(alone_ids[0], ids[0])
    alone = prefill(model, alone_ids, config, **alone_extra)
    torch.testing.assert_close(together.logits[:1], alone.logits, atol=1e-4, rtol=1e-4)
    assert together.stats.kept_tokens[0] == alone.stats.kept_tokens[0]


def test_image_eligibility_without_images_is_an_error(one_thread):
    model = build_vlm("llava")
    ids = torch.randint(3, 100, (1, 12))
    with pytest.raises(ValueError, match="has none"):
        prefill(model, ids, DashConfig(halt_ratio=0.5, eligible="image"))


def test_text_model_rejects_image_inputs(one_thread):
    from conftest import build_model
    model = build_model("llama")
    with pytest.raises(ValueError, match="text model"):
        prefill(model, torch.randint(3, 90, (1, 12)), DashConfig(), pixel_values=torch.zeros(1, 3, 8, 8))


class _Tokenizer:
    pad_token_id, eos_token_id = 0, 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_generate_takes_processor_outputs_and_matches_hf_greedy_at_rho_zero(vlm, one_thread):
    from dash_prefill.hf.generation import generate
    model = build_vlm(vlm)
    ids, extra = _split(vlm_inputs(model, images=2, grids=GRIDS))
    with torch.no_grad():
        expected = model.generate(input_ids=ids, **extra, max_new_tokens=4, min_new_tokens=4,
                                  do_sample=False)[0, ids.shape[1]:].tolist()
    result = generate(model, _Tokenizer(), ids, DashConfig(halt_ratio=0.0), max_new_tokens=4,
                      attention_mask=torch.ones_like(ids), eos_token_id=-1, **extra)
    assert result.token_ids[0] == expected


def test_vision_config_halts_inside_the_encoder_as_the_patched_hf_forward_does(vlm, one_thread):
    from dash_prefill.hf.vision import halted_vision
    model = build_vlm(vlm)
    ids, extra = _split(vlm_inputs(model, images=2, grids=GRIDS))
    # Start at the first encoder layer: Llava reads the second-to-last of 3 layers.
    vision = DashConfig(halt_ratio=0.5, start_layer=0)
    with torch.no_grad():
        with halted_vision(model, vision):
            expected = model(input_ids=ids, **extra).logits[:, -1].float()
    result = prefill(model, ids, DashConfig(halt_ratio=0.0), vision_config=vision, **extra)
    torch.testing.assert_close(result.logits, expected, atol=1e-5, rtol=1e-5)
    # The encoder did halt: image embeddings changed, text embeddings did not.
    adapter, image = adapter_for(model), ids[0] == IMAGE_TOKEN
    halted = prompt_inputs(adapter, ids, None, extra, vision).embeds[0]
    full = prompt_inputs(adapter, ids, None, extra).embeds[0]
    assert torch.equal(halted[~image], full[~image])
    assert (halted[image] - full[image]).abs().max() > 1e-4


def _padded_pair(model):
    """Row 0: two images; row 1: one image, left-padded. Also returns row 1's own inputs."""
    a = vlm_inputs(model, images=2, grids=GRIDS, seed=1)
    b = vlm_inputs(model, images=1, grids=GRIDS[:1], seed=2)
    length, pad = a["input_ids"].shape[1], a["input_ids"].shape[1] - b["input_ids"].shape[1]

    def left(row):
        return torch.cat([torch.zeros(pad, dtype=row.dtype), row])
    batch = {"input_ids": torch.stack([a["input_ids"][0], left(b["input_ids"][0])]),
             "attention_mask": (torch.arange(length)[None] >= torch.tensor([0, pad])[:, None]).long(),
             "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]])}
    if "image_grid_thw" in a:
        batch["image_grid_thw"] = torch.cat([a["image_grid_thw"], b["image_grid_thw"]])
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in a:
            batch[key] = torch.stack([a[key][0], left(b[key][0])])
    return batch, b


@pytest.mark.parametrize("eligible", ["all", "image"])
def test_left_padded_rows_with_different_image_counts_match_hf_and_each_row_alone(vlm, eligible, one_thread):
    model = build_vlm(vlm)
    batch, second = _padded_pair(model)
    with torch.no_grad():
        expected = model(**batch).logits[:, -1].float()
    ids, extra = _split(batch)
    mask = extra.pop("attention_mask")
    plain = prefill(model, ids, DashConfig(halt_ratio=0.0), attention_mask=mask, **extra)
    torch.testing.assert_close(plain.logits, expected, atol=1e-5, rtol=1e-5)
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_first=2, protect_last=3,
                        eligible=eligible)
    together = prefill(model, ids, config, attention_mask=mask, **extra)
    alone_ids, alone_extra = _split(second)
    alone = prefill(model, alone_ids, config, **alone_extra)
    torch.testing.assert_close(together.logits[1:], alone.logits, atol=1e-5, rtol=1e-5)


def test_incomplete_processor_output_is_a_clear_error(one_thread):
    model = build_vlm("qwen2_vl")
    ids, extra = _split(vlm_inputs(model))
    extra.pop("image_grid_thw")
    with pytest.raises(ValueError, match="could not build its inputs.*image_grid_thw"):
        prefill(model, ids, DashConfig(), **extra)


def test_generate_refuses_an_attention_mask_for_string_prompts(one_thread):
    from dash_prefill.hf.generation import generate
    model = build_vlm("llava")
    with pytest.raises(ValueError, match="left-padded id tensor"):
        generate(model, _Tokenizer(), ["a prompt"], attention_mask=torch.ones(1, 3))

"""Halting inside the vision towers of VLMs (Llava/CLIP, Gemma 3/SigLIP, Qwen2-VL, Qwen2.5-VL).

The slow reference below never compacts: it runs every layer on the full sequence, masks the
halted tokens out as keys from the start layer on and resets their hidden states to their
start-layer output after every later layer. Its selection is its own (top-k per image).
"""

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.vision_utils import get_vision_window_index

from dash_prefill.core.config import DashConfig
from dash_prefill.core.policy import random_scores
from dash_prefill.hf.vision import find_vision_tower, halted_vision

TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
QWEN_TEXT = dict(TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1]))
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32)
QWEN_VIT = dict(depth=4, num_heads=4, patch_size=2, temporal_patch_size=2, in_channels=3, spatial_merge_size=2)
PATCH_DIM = 3 * 2 * 2 * 2  # Qwen's flattened patch: channels x temporal x patch x patch

FAMILIES = {
    # 32x32 pixels, patch 8: 16 patches + CLS.
    "llava": lambda: LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(**VIT, patch_size=8), text_config=LlamaConfig(**TEXT), image_token_id=5)),
    # 32x32 pixels, patch 4: 64 patches, pooled to 16 image tokens.
    "gemma3": lambda: Gemma3ForConditionalGeneration(Gemma3Config(
        vision_config=SiglipVisionConfig(**VIT, patch_size=4), text_config=Gemma3TextConfig(**TEXT, head_dim=8),
        mm_tokens_per_image=16, image_token_id=5)),
    "qwen2_vl": lambda: Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config=QWEN_TEXT, vision_config=dict(QWEN_VIT, embed_dim=32, hidden_size=32, mlp_ratio=2),
        image_token_id=5)),
    # Windows of 2x2 merged tokens (16 patches); blocks 1 and 3 attend over the whole image.
    "qwen2_5_vl": lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=QWEN_TEXT, vision_config=dict(QWEN_VIT, hidden_size=32, intermediate_size=64, out_hidden_size=32,
                                                  window_size=8, fullatt_block_indexes=[1, 3]),
        image_token_id=5)),
}
# Qwen images as (t, h, w) patch grids: two sizes per model, the larger split into several windows.
GRIDS = {"qwen2_vl": [[1, 4, 4], [1, 4, 6]], "qwen2_5_vl": [[1, 8, 8], [1, 4, 8]]}


@pytest.fixture(scope="module")
def models():
    built = {}
    for seed, (name, make) in enumerate(FAMILIES.items()):
        torch.manual_seed(seed)
        model = make().float().eval()
        with torch.no_grad():
            # HF's small init makes attention nearly uniform, which would hide errors in which
            # keys a token sees and where it sits (rotary); unit-scale weights make it peaked.
            for parameter in model.parameters():
                if parameter.dim() == 1:
                    parameter.add_(torch.randn_like(parameter) * 0.1)
                else:
                    parameter.normal_(0.0, 1.5 * parameter[0].numel() ** -0.5)
        built[name] = model
    return built


def images(name: str, seed: int = 0, which: list[int] | None = None) -> tuple:
    """get_image_features arguments: two images, or the images numbered ``which``."""
    generator = torch.Generator().manual_seed(seed)
    device = torch.get_default_device()
    if name in GRIDS:
        grids = GRIDS[name]
        pixels = [torch.randn(t * h * w, PATCH_DIM, generator=generator, device="cpu") for t, h, w in grids]
        which = which if which is not None else range(len(grids))
        return torch.cat([pixels[i] for i in which]).to(device), torch.tensor([grids[i] for i in which])
    pixels = torch.randn(2, 3, 32, 32, generator=generator, device="cpu").to(device)
    return (pixels if which is None else pixels[which],)


@torch.no_grad()
def features(model, inputs) -> torch.Tensor:
    """Image features as the language model receives them: (tokens, hidden) for every image."""
    out = model.model.get_image_features(*inputs).pooler_output
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in out])


# --- The slow reference -----------------------------------------------------------------------

def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def batched_layer(layer, hidden, keys_ok):
    """A CLIP/SigLIP layer with keys masked by ``keys_ok`` (images, tokens). -> (out, U)."""
    attention = layer.self_attn
    x = layer.layer_norm1(hidden)
    b, t, _ = x.shape

    def heads(projection):
        return projection(x).view(b, t, attention.num_heads, attention.head_dim).transpose(1, 2)

    logits = heads(attention.q_proj) @ heads(attention.k_proj).transpose(-1, -2) * attention.scale
    logits = logits.masked_fill(~keys_ok[:, None, None, :], float("-inf"))
    mixed = (logits.softmax(-1) @ heads(attention.v_proj)).transpose(1, 2).reshape(b, t, -1)
    update = attention.out_proj(mixed)
    hidden = hidden + update
    return hidden + layer.mlp(layer.layer_norm2(hidden)), update


def packed_block(block, hidden, keys_ok, cu_seqlens, rotary):
    """A Qwen vision block on the packed sequence with keys masked by ``keys_ok`` (tokens,)."""
    attention = block.attn
    x = block.norm1(hidden)
    n = x.shape[0]
    q, k, v = attention.qkv(x).reshape(n, 3, attention.num_heads, -1).unbind(1)  # (n, heads, dim)
    cos, sin = (t[:, None, :].float() for t in rotary)
    q, k = (y * cos + rotate_half(y) * sin for y in (q, k))
    segment = torch.searchsorted(cu_seqlens.long(), torch.arange(n), right=True)
    allowed = (segment[:, None] == segment[None, :]) & keys_ok[None, :]
    logits = torch.einsum("nhd,mhd->hnm", q, k) * attention.scaling
    mixed = torch.einsum("hnm,mhd->nhd", logits.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    update = attention.proj(mixed.reshape(n, -1))
    hidden = hidden + update
    return hidden + block.mlp(block.norm2(hidden)), update


def keep_best(scores, ratio, protect_first_token=False):
    """Active mask over the last dimension: n - int(ρ·n) of the n eligible tokens, best first."""
    eligible = scores.shape[-1] - int(protect_first_token)
    if protect_first_token:
        scores = torch.cat([torch.full_like(scores[..., :1], float("inf")), scores[..., 1:]], dim=-1)
    keep = scores.shape[-1] - int(ratio * eligible)
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, scores.topk(keep, dim=-1).indices, True)


@torch.no_grad()
def reference_features(model, name, inputs, config: DashConfig, return_states=False):
    tower, _ = find_vision_tower(model)
    packed = name in GRIDS
    layers = tower.blocks if packed else tower.encoder.layers
    captured = []  # inputs of every layer in a plain run: hidden states, cu_seqlens, rotary
    hooks = [layer.register_forward_pre_hook(lambda m, args, kwargs: captured.append((args[0], kwargs)),
                                             with_kwargs=True) for layer in layers]
    try:
        model.model.get_image_features(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    hidden = captured[0][0]
    start = config.resolve_start_layer(len(layers))
    keys_ok = torch.ones(hidden.shape[:-1], dtype=torch.bool)
    states = [hidden]
    for i, layer in enumerate(layers):
        if packed:
            kwargs = captured[i][1]
            out, update = packed_block(layer, hidden, keys_ok, kwargs["cu_seqlens"], kwargs["position_embeddings"])
        else:
            out, update = batched_layer(layer, hidden, keys_ok)
        if i == start:
            if config.policy == "random":
                scores = random_scores(1 if packed else hidden.shape[0], hidden.shape[-2], config.seed, hidden.device)
                scores = scores[0] if packed else scores
            else:
                scores = update.norm(dim=-1)
                if config.score == "relative":
                    scores = scores / hidden.norm(dim=-1)
            if packed:
                frames = [h * w for t, h, w in inputs[1].tolist() for _ in range(t)]
                keys_ok = torch.cat([keep_best(part, config.halt_ratio) for part in scores.split(frames)])
            else:
                keys_ok = keep_best(scores, config.halt_ratio, protect_first_token=name == "llava")
            frozen = out
        elif i > start:
            out = torch.where(keys_ok[..., None], out, frozen)
        hidden = out
        states.append(hidden)
    if return_states:
        return states
    projector = getattr(model.model, "multi_modal_projector", None)
    if name == "llava":
        return torch.cat(list(projector(states[-2][:, 1:])))
    if name == "gemma3":
        return projector(tower.post_layernorm(states[-1])).reshape(-1, model.config.text_config.hidden_size)
    merged = tower.merger(states[-1])
    if name == "qwen2_5_vl":
        window_index, _ = get_vision_window_index(inputs[1], tower.spatial_merge_size, tower.window_size,
                                                  tower.patch_size)
        merged = merged[torch.argsort(window_index)]
    return merged


# --- Properties -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FAMILIES))
def test_zero_ratio_matches_plain_features(models, name, one_thread):
    model, inputs = models[name], images(name)
    plain = features(model, inputs)
    for config in (None, DashConfig(halt_ratio=0.0), DashConfig(policy="none")):
        with halted_vision(model, config) as record:
            assert record is None
            assert torch.equal(features(model, inputs), plain)
    # The reference itself is the plain encoder when nothing halts.
    reference = reference_features(model, name, inputs, DashConfig(halt_ratio=0.0, start_layer=1))
    torch.testing.assert_close(reference, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("policy,score,start,ratio", [
    ("dash", "absolute", 1, 0.5), ("dash", "relative", 0, 0.5), ("random", "absolute", 1, 0.5),
    ("dash", "absolute", 0, 0.9),  # Qwen2.5-VL: some windows halt whole and vanish
])
def test_halting_matches_masked_reference(models, name, policy, score, start, ratio, one_thread):
    model, inputs = models[name], images(name)
    config = DashConfig(halt_ratio=ratio, start_layer=start, policy=policy, score=score, seed=3)
    with halted_vision(model, config) as record:
        halted = features(model, inputs)
    assert record.start_layer == start and len(record.selections) == 1
    reference = reference_features(model, name, inputs, config)
    torch.testing.assert_close(halted, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(halted, features(model, inputs), atol=1e-4), "halting changed nothing"


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_every_hidden_state_matches_reference(models, name, one_thread):
    model, inputs = models[name], images(name)
    tower, _ = find_vision_tower(model)
    config = DashConfig(halt_ratio=0.5, start_layer=1)
    with torch.no_grad(), halted_vision(model, config):
        states = tower(*inputs, output_hidden_states=True).hidden_states
    reference = reference_features(model, name, inputs, config, return_states=True)
    assert len(states) == len(reference) == 5
    for k, (state, expected) in enumerate(zip(states, reference)):
        torch.testing.assert_close(state, expected, rtol=1e-4, atol=1e-4, msg=f"hidden_states[{k}]")


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_class_token_never_halts_and_counts_are_per_image(models, ratio, one_thread):
    model, inputs = models["llava"], images("llava")
    for seed in range(5):  # random scores: the class token would lose about ratio of the draws
        with halted_vision(model, DashConfig(halt_ratio=ratio, start_layer=1, policy="random", seed=seed)) as record:
            features(model, inputs)
        selection = record.selections[0]
        assert bool((selection.active_index == 0).any(dim=-1).all())
        assert selection.halted_per_image == [int(ratio * 16)] * 2  # 16 patches eligible, CLS not
    for name, eligible in (("gemma3", [64, 64]), ("qwen2_vl", [16, 24]), ("qwen2_5_vl", [64, 32])):
        with halted_vision(models[name], DashConfig(halt_ratio=ratio, start_layer=1)) as record:
            features(models[name], images(name))
        assert record.selections[0].halted_per_image == [int(ratio * n) for n in eligible]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_images_in_a_batch_halt_independently(models, name, one_thread):
    model = models[name]
    config = DashConfig(halt_ratio=0.5, start_layer=1)
    with halted_vision(model, config) as record:
        together = features(model, images(name))
        alone = [features(model, images(name, which=[i])) for i in range(2)]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)
    both, first, second = record.selections
    assert both.kept_per_image == first.kept_per_image + second.kept_per_image
    if name in GRIDS:  # packed: the second image's indices follow the first image's tokens
        offset = first.tokens_per_image[0]
        torch.testing.assert_close(both.active_index, torch.cat([first.active_index, second.active_index + offset]))
    else:
        torch.testing.assert_close(both.active_index, torch.cat([first.active_index, second.active_index]))
        assert not torch.equal(both.active_index[0], both.active_index[1])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_patch_is_removed_after_exit_even_on_error(models, name, one_thread):
    model, inputs = models[name], images(name)
    tower, family = find_vision_tower(model)
    modules = [tower, *family.layers(tower)]
    plain = features(model, inputs)
    with halted_vision(model, DashConfig(halt_ratio=0.5, start_layer=1)):
        assert "forward" in tower.__dict__ and all("forward" in m.__dict__ for m in modules[2:])
        with pytest.raises(RuntimeError, match="already"):
            with halted_vision(model, DashConfig(halt_ratio=0.5)):
                pass
    assert not any("forward" in m.__dict__ for m in modules)
    with pytest.raises(KeyError):
        with halted_vision(model, DashConfig(halt_ratio=0.5, start_layer=1)):
            features(model, inputs)
            raise KeyError("boom")
    assert not any("forward" in m.__dict__ for m in modules)
    assert torch.equal(features(model, inputs), plain)


def test_unsupported_models_and_policies_are_refused(models):
    with pytest.raises(ValueError, match="CLIPVisionModel"):
        with halted_vision(torch.nn.Linear(2, 2), DashConfig()):
            pass
    with pytest.raises(ValueError, match="attention"):
        with halted_vision(models["llava"], DashConfig(policy="attention")):
            pass
    with pytest.raises(ValueError, match="beyond"):
        with halted_vision(models["llava"], DashConfig(start_layer=4)):
            pass

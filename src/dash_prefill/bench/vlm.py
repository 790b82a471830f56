"""Vision-language models in real shapes with random weights, and a synthetic image prompt.

``dash-prefill bench --arch llava-1.5-7b,qwen2-vl-7b --image-tokens 576,2304`` times the whole
prefill (vision encoder, projector and decoder) of a prompt of ``--text-tokens`` text tokens
around images that take the given number of decoder tokens, for plain HF and DASH variants.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from dash_prefill.core.config import DashConfig
from dash_prefill.hf.prefill import prefill
from dash_prefill.hf.adapters import output_cache
from dash_prefill.bench.shapes import _random_init, _rope, _skip_init


def _llava_1_5_7b():
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                       max_position_embeddings=4096, tie_word_embeddings=False,
                       **_rope(LlamaConfig, 10_000.0))
    return LlavaForConditionalGeneration, LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")


def _qwen2_vl_7b():
    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    mrope = {"mrope_section": [16, 24, 24]}
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                tie_word_embeddings=False, rope_scaling={"type": "mrope", **mrope},
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, **mrope})
    return Qwen2VLForConditionalGeneration, Qwen2VLConfig(
        vision_config=vision, text_config=text, image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653)


VLM_ARCHITECTURES = {"llava-1.5-7b": _llava_1_5_7b, "qwen2-vl-7b": _qwen2_vl_7b}


def build_random_vlm(arch: str, dtype: torch.dtype = torch.bfloat16, device="cpu",
                     attn_implementation: str = "sdpa", seed: int = 0):
    """A VLM of ``arch``'s real shape with random weights, built directly on ``device``."""
    model_class, config = VLM_ARCHITECTURES[arch]()
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = attn_implementation
    with torch.device(device), _skip_init():
        model = model_class(config).to(dtype)
    model.eval()
    if torch.device(device).type != "meta":
        _random_init(model, seed)
    return model


def synthetic_inputs(model, image_tokens: int, text_tokens: int, device, seed: int = 0) -> dict:
    """A prompt of ``text_tokens`` random text tokens around images taking ``image_tokens``
    decoder tokens: Llava repeats its 576-token image; Qwen2-VL takes one square image."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    specials = [getattr(config, name, None) for name in
                ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")]
    vocab = min([config.text_config.vocab_size, 30000] + [s for s in specials if s is not None])
    if config.model_type == "llava":
        per_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        if image_tokens % per_image:
            raise ValueError(f"llava images take {per_image} tokens each; use a multiple of it")
        images = image_tokens // per_image
        size = config.vision_config.image_size
        pixel = {"pixel_values": torch.randn(images, 3, size, size, generator=generator, device="cpu")}
    else:
        vision = config.vision_config
        side = math.isqrt(image_tokens)
        if side * side != image_tokens:
            raise ValueError(f"qwen2-vl synthetic images are square: use a square token count, not {image_tokens}")
        grid = (1, side * vision.spatial_merge_size, side * vision.spatial_merge_size)
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        pixel = {"pixel_values": torch.randn(grid[0] * grid[1] * grid[2], width, generator=generator, device="cpu"),
                 "image_grid_thw": torch.tensor([grid], device="cpu")}
    head = torch.randint(3, vocab, (text_tokens // 4,), generator=generator, device="cpu")
    tail = torch.randint(3, vocab, (text_tokens - text_tokens // 4,), generator=generator, device="cpu")
    image = torch.full((image_tokens,), config.image_token_id, device="cpu")
    ids = torch.cat([head, image, tail])[None]
    inputs = {"input_ids": ids, **pixel}
    if config.model_type != "llava":
        inputs["mm_token_type_ids"] = (ids == config.image_token_id).long()
    return {k: v.to(device) for k, v in inputs.items()}


def vlm_plain_method(model, inputs):
    """The model's own forward over the whole prompt, last position's logits only."""
    output = model(**inputs, use_cache=True, logits_to_keep=1)
    return output.logits[:, -1], output_cache(output), 1.0


def vlm_dash_method(config: DashConfig, vision_config: DashConfig | None = None):
    """DASH prefill of the decoder (and, with ``vision_config``, of the vision encoder)."""
    def run(model, inputs):
        extra = {k: v for k, v in inputs.items() if k != "input_ids"}
        result = prefill(model, inputs["input_ids"], config, vision_config=vision_config, **extra)
        return result.logits, result.cache, max(result.stats.kept_tokens) / inputs["input_ids"].shape[1]
    return run


def vlm_methods(settings, vision: DashConfig) -> list[tuple[str, float, int | float, object]]:
    """(method, halt_ratio, start, fn): plain, DASH at ρ=0, then per (start, ρ) setting DASH on
    every token, on image tokens only, and on every token with halting in the vision encoder."""
    methods = [("plain", 0.0, 1.0, vlm_plain_method),
               ("dash", 0.0, settings[0][0], vlm_dash_method(DashConfig(halt_ratio=0.0, start_layer=settings[0][0])))]
    for start, ratio in settings:
        for name, eligible, encoder in (("dash", "all", None), ("dash-image", "image", None),
                                        ("dash+vit", "all", vision)):
            config = DashConfig(halt_ratio=ratio, start_layer=start, eligible=eligible)
            methods.append((name, ratio, start, vlm_dash_method(config, encoder)))
    return methods


def run_vlm_bench(archs: list[str], image_tokens: list[int], text_tokens: int, settings,
                  vision: DashConfig, device: torch.device, dtype: torch.dtype, attn: str = "sdpa",
                  warmup: int = 2, repeats: int = 5, seed: int = 0) -> list[dict]:
    """Every method on the same synthetic prompt per (arch, image tokens); rows as ``run_bench``'s."""
    from tqdm.auto import tqdm

    from dash_prefill.core.config import start_layer_index
    from dash_prefill.bench.runner import BenchPlan, _add_speedups, _free, _measure_or_skip, _row

    unknown = [a for a in archs if a not in VLM_ARCHITECTURES]
    if unknown:
        raise ValueError(f"unknown vision-language architectures {unknown}; choose from {', '.join(VLM_ARCHITECTURES)}")
    plan = BenchPlan(targets=[], lengths=[], batches=[1], settings=settings, device=device,
                     warmup=warmup, repeats=repeats)
    methods = vlm_methods(settings, vision)
    rows = []
    progress = tqdm(total=len(archs) * len(image_tokens) * len(methods), desc="bench vlm", unit="run")
    for arch in archs:
        model = build_random_vlm(arch, dtype, device, attn, seed)
        text = model.config.get_text_config()
        for count in image_tokens:
            inputs = synthetic_inputs(model, count, text_tokens, device, seed)
            length = inputs["input_ids"].shape[1]
            for method, ratio, start, fn in methods:
                progress.set_postfix_str(f"{arch} img={count} {method} ρ={ratio}")
                timing, status = _measure_or_skip(plan, fn, model, inputs, f"{arch} {method}")
                index = text.num_hidden_layers if method == "plain" else start_layer_index(start, text.num_hidden_layers)
                row = _row(arch, length, 1, method, ratio, index, timing, status, text)
                # The cost model counts decoder FLOPs only; the vision encoder is not in it, so
                # no efficiency is claimed for VLM rows.
                row["image_tokens"], row["decoder_ideal_speedup"] = count, row.pop("ideal_speedup")
                row["ideal_speedup"] = None
                rows.append(row)
                progress.update(1)
        del model
        _free(device)
    progress.close()
    _add_speedups(rows)
    return rows

"""Tiny random vision-language models of every supported family, with matching inputs.

``build_vlm(family)`` returns a model in eval mode; ``vlm_inputs(model, ...)`` returns the
processor-like inputs (input_ids with image placeholders, pixel_values and the rest).
"""

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

TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 120, 121, 122, 123


def _llava():
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                              num_attention_heads=4, image_size=28, patch_size=7, projection_dim=32)
    return LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2, vision_feature_select_strategy="default"))


def _qwen_vision(**extra):
    return dict(depth=3, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4,
                spatial_merge_size=2, temporal_patch_size=2, in_channels=3, **extra)


def _qwen_text():
    return dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def _qwen2_vl():
    config = Qwen2VLConfig(vision_config=dict(_qwen_vision(mlp_ratio=2)), text_config=_qwen_text(),
                           image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                           vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    return Qwen2VLForConditionalGeneration(config)


def _qwen2_5_vl():
    vision = _qwen_vision(intermediate_size=48, out_hidden_size=64, window_size=16,
                          fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=_qwen_text(),
                              image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                              vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    return Qwen2_5_VLForConditionalGeneration(config)


def _gemma3():
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                num_attention_heads=4, image_size=16, patch_size=4)
    text = Gemma3TextConfig(**TEXT, head_dim=16, sliding_window=8,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                         "sliding_attention"])
    return Gemma3ForConditionalGeneration(Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=4, image_token_id=IMAGE_TOKEN,
        boi_token_index=VISION_START, eoi_token_index=VISION_END))


BUILDERS = {"llava": _llava, "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "gemma3": _gemma3}


def build_vlm(family: str, implementation: str = "sdpa", seed: int = 0):
    """A tiny random VLM of ``family`` in float32 eval mode, norms spread so scores differ."""
    torch.manual_seed(seed)
    model = BUILDERS[family]()
    model.config._attn_implementation = implementation
    for sub in ("text_config", "vision_config"):
        getattr(model.config, sub)._attn_implementation = implementation
    model = model.float().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
            elif not parameter.any():  # Gemma-3's image projection starts at zero
                parameter.normal_(0.0, 0.1)
    return model


def image_token_count(model, grid=None) -> int:
    """Placeholder tokens one image takes in the prompt."""
    family = model.config.model_type
    if family == "llava":
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2
    if family == "gemma3":
        return model.config.mm_tokens_per_image
    t, h, w = grid
    return t * h * w // model.config.vision_config.spatial_merge_size ** 2


def vlm_inputs(model, text_before: int = 6, text_after: int = 9, images: int = 1, batch: int = 1,
               grids=((1, 4, 4),), seed: int = 1) -> dict:
    """Processor-like inputs: per row ``text | <start> image <end> | ...`` repeated ``images``
    times, then ``text_after`` tokens. Qwen grids (t, h, w) in patches cycle through ``grids``."""
    family = model.config.model_type
    generator = torch.Generator().manual_seed(seed)
    rows, pixels, grid_rows = [], [], []
    for _ in range(batch):
        ids = []
        for index in range(images):
            grid = grids[index % len(grids)]
            ids += torch.randint(3, 100, (text_before,), generator=generator, device="cpu").tolist()
            ids += [VISION_START] + [IMAGE_TOKEN] * image_token_count(model, grid) + [VISION_END]
            if family in ("qwen2_vl", "qwen2_5_vl"):
                vision = model.config.vision_config
                t, h, w = grid
                width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
                pixels.append(torch.randn(t * h * w, width, generator=generator, device="cpu"))
                grid_rows.append(list(grid))
            else:
                size = model.config.vision_config.image_size
                pixels.append(torch.randn(1, 3, size, size, generator=generator, device="cpu"))
        ids += torch.randint(3, 100, (text_after,), generator=generator, device="cpu").tolist()
        rows.append(ids)
    input_ids = torch.tensor(rows)
    inputs = {"input_ids": input_ids, "pixel_values": torch.cat(pixels).to(input_ids.device)}  # the CPU draw, on the default device
    is_image = (input_ids == IMAGE_TOKEN).long()
    if family in ("qwen2_vl", "qwen2_5_vl"):
        inputs["image_grid_thw"] = torch.tensor(grid_rows)
        inputs["mm_token_type_ids"] = is_image
    if family == "gemma3":
        inputs["token_type_ids"] = is_image
    return inputs

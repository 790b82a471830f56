"""Real architectures' shapes, built offline with random weights (no hub, no checkpoint).

Prefill speed depends on the shapes (layers, widths, heads, vocabulary, attention windows)
and not on the weight values, so a random model of the real shape times like the real one.
"""

from __future__ import annotations

import contextlib
import inspect
import logging

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

logger = logging.getLogger(__name__)


def _rope(config_class, theta: float, scaling: dict | None = None) -> dict:
    """Rope keywords in the config's own spelling: ``rope_parameters`` (transformers 5) or
    ``rope_theta`` / ``rope_scaling`` (older configs)."""
    if "rope_parameters" in inspect.signature(config_class.__init__).parameters:
        return {"rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": theta}}
    return {"rope_theta": theta, **({"rope_scaling": scaling} if scaling else {})}


def _gemma_rope(full_theta: float, scaling: dict | None) -> dict:
    """Gemma-3 has one rope table per layer type: local (sliding) and global (full)."""
    full = {"rope_type": "default", **(scaling or {}), "rope_theta": full_theta}
    sliding = {"rope_type": "default", "rope_theta": 10_000.0}
    if "rope_parameters" in inspect.signature(Gemma3TextConfig.__init__).parameters:
        return {"rope_parameters": {"full_attention": full, "sliding_attention": sliding}}
    return {"rope_theta": full_theta, "rope_local_base_freq": 10_000.0,
            **({"rope_scaling": scaling} if scaling else {})}


def _gemma_layers(num_layers: int) -> list[str]:
    """Gemma-3's pattern: five sliding-window layers, then one full-attention layer."""
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_layers)]


def _llama_3_1_8b():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                       max_position_embeddings=131072, tie_word_embeddings=False,
                       **_rope(LlamaConfig, 500_000.0, scaling))


def _qwen2_5_7b():
    return Qwen2Config(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                       max_position_embeddings=131072, use_sliding_window=False,
                       tie_word_embeddings=False, **_rope(Qwen2Config, 1_000_000.0))


def _mistral_7b():
    # Mistral-7B-v0.3 ships max_position_embeddings=32768; raised to 131072 so 128K prompts run.
    return MistralConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, intermediate_size=14336,
                         vocab_size=32768, sliding_window=None, max_position_embeddings=131072,
                         tie_word_embeddings=False, **_rope(MistralConfig, 1_000_000.0))


def _gemma_3_4b():
    return Gemma3TextConfig(hidden_size=2560, num_hidden_layers=34, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=256, intermediate_size=10240,
                            vocab_size=262208, sliding_window=1024, layer_types=_gemma_layers(34),
                            max_position_embeddings=131072, query_pre_attn_scalar=256,
                            tie_word_embeddings=True,
                            **_gemma_rope(1_000_000.0, {"rope_type": "linear", "factor": 8.0}))


def _qwen3_8b():
    # Qwen3-8B ships 40960 positions and reaches 131072 with YaRN; the shapes are the same.
    return Qwen3Config(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                       vocab_size=151936, max_position_embeddings=131072, use_sliding_window=False,
                       tie_word_embeddings=False, **_rope(Qwen3Config, 1_000_000.0))


def _smollm2_135m():
    return LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                       max_position_embeddings=8192, tie_word_embeddings=True,
                       **_rope(LlamaConfig, 100_000.0))


def _gemma3_270m():
    return Gemma3TextConfig(hidden_size=640, num_hidden_layers=18, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=256, intermediate_size=2048,
                            vocab_size=262144, sliding_window=512, layer_types=_gemma_layers(18),
                            max_position_embeddings=32768, query_pre_attn_scalar=256,
                            tie_word_embeddings=True, **_gemma_rope(1_000_000.0, None))


ARCHITECTURES = {
    "llama-3.1-8b": _llama_3_1_8b,
    "qwen2.5-7b": _qwen2_5_7b,
    "mistral-7b": _mistral_7b,
    "gemma-3-4b": _gemma_3_4b,
    "qwen3-8b": _qwen3_8b,
    "smollm2-135m": _smollm2_135m,
    "gemma3-270m": _gemma3_270m,
}


def arch_config(arch: str):
    """The transformers config of ``arch`` (a key of ``ARCHITECTURES``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]()


def _skip_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def build_random_model(arch: str, dtype: torch.dtype = torch.bfloat16, device="cpu",
                       attn_implementation: str = "sdpa", seed: int = 0, config=None):
    """A model of ``arch``'s real shape with random weights, built directly on ``device``.

    Parameters
    ----------
    arch : str
        A key of ``ARCHITECTURES`` (ignored when ``config`` is given).
    dtype, device, attn_implementation :
        As for ``from_pretrained``; ``device="meta"`` allocates nothing (shapes only).
    seed : int
        Seed of the random weights: normal(0, 0.02) matrices, norms at their neutral value ± 0.02.
    config : PretrainedConfig, optional
        Use this config instead of ``arch``'s (for scaled-down test models).
    """
    config = config if config is not None else arch_config(arch)
    with torch.device(device), _skip_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.tie_weights()  # skipping the init also skips tying the embeddings to the head
    model.eval()
    if torch.device(device).type != "meta":
        _random_init(model, seed)
        logger.info("built %s with random weights on %s: prefill speed does not depend on weight "
                    "values, only on the shapes", arch, device)
    return model


@torch.no_grad()
def _random_init(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for name, parameter in model.named_parameters():
        if parameter.dim() >= 2:
            parameter.normal_(0.0, 0.02)
        else:
            # Gemma norms scale by (1 + w), the others by w: start each at its neutral value.
            neutral = 0.0 if "gemma" in model.config.model_type else 1.0
            parameter.normal_(neutral, 0.02)
    for buffer_name, buffer in model.named_buffers():
        if not torch.isfinite(buffer).all():
            raise RuntimeError(f"buffer {buffer_name} is not finite after building the model")


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def least_memory(arch: str, dtype: torch.dtype, batch: int, length: int) -> tuple[int, int]:
    """(weights, plain-prefill KV cache) in bytes for ``arch`` at ``batch`` x ``length``: the
    least a benchmark run holds at once (activations come on top)."""
    size = torch.empty((), dtype=dtype).element_size()
    weights = parameter_count(build_random_model(arch, dtype, "meta")) * size
    return weights, kv_bytes(arch_config(arch), batch, length, size)


def kv_bytes(config, batch: int, length: int, element_size: int) -> int:
    """Keys plus values of a plain cache of ``length`` tokens (sliding-window layers capped)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    window = getattr(config, "sliding_window", None) or length
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    cached = sum(min(window, length) if kind == "sliding_attention" else length for kind in types)
    return 2 * cached * config.num_key_value_heads * head_dim * batch * element_size


def split_across(model: torch.nn.Module, devices: list) -> torch.nn.Module:
    """Shard ``model``'s decoder layers evenly over ``devices`` with accelerate (as
    ``device_map="auto"`` does): embeddings and rotary tables on the first, norm and head on
    the last. Returns the dispatched model; a single device returns it unchanged."""
    if len(devices) <= 1:
        return model
    from accelerate import dispatch_model

    layers = len(model.model.layers)
    device_map = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0],
                  "model.norm": devices[-1], "lm_head": devices[-1]}
    for index in range(layers):
        device_map[f"model.layers.{index}"] = devices[index * len(devices) // layers]
    return dispatch_model(model, device_map=device_map)

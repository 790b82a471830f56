"""Per-family adapters: the only place where model architectures differ.

An adapter splits a decoder layer into its attention output U (what DASH scores), what that adds
to the residual stream, and its feed-forward step; it knows how the family projects and rotates
queries and keys, builds rotary tables and turns the last hidden state into logits. Each family's
difference lives in its own subclass (Phi-3's fused QKV, Qwen3/Gemma-3's q/k norms, Gemma-3's
sandwich norms and per-layer-type rotary); the layer loop never asks which family it runs.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from transformers.models.llama import modeling_llama
from transformers.models.phi3 import modeling_phi3

from dash_prefill.core.cost import layer_types, layer_windows



@functools.cache
def _cache_keyword(module_class: type) -> str:
    # transformers renamed `past_key_values` to `cache` during 5.x; accept both.
    parameters = inspect.signature(module_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(output):
    """The cache of a HF causal-LM output (``cache`` in recent transformers, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def generate_cache_keyword(model) -> str:
    """The keyword under which ``model``'s forward (and HF ``generate``) takes a cache."""
    return _cache_keyword(type(model))


def context_limit(model: nn.Module) -> int | None:
    """The longest sequence (prompt plus generated tokens) the model's positions cover."""
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def input_device(model: nn.Module) -> torch.device:
    """The device of the token embeddings: where prompts and generated tokens go in."""
    return model.get_input_embeddings().weight.device


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's weights (layers may live on different GPUs)."""
    return next(module.parameters()).device


class PreNormAdapter:
    """Llama-style pre-norm layer: h' = h + U, U = Attn(Norm(h)); h'' = h' + MLP(Norm(h')).

    Llama, Mistral, Qwen2/2.5 and the decoders of Llava, Qwen2-VL and Qwen2.5-VL. Subclasses
    override only what their family does differently.
    """

    rotate = staticmethod(modeling_llama.apply_rotary_pos_emb)

    def __init__(self, model: nn.Module):
        self.model = model
        # A vision-language model wraps its decoder: model.model.language_model.
        self.base = getattr(model.model, "language_model", model.model)
        self.config = model.config.get_text_config()
        self.multimodal = self.base is not model.model
        self.layer_types = layer_types(self.config)
        self.windows = layer_windows(self.config)
        # Read once here: a compiled decode step cannot trace inspect.signature.
        self.cache_keyword = _cache_keyword(type(self.layers[0].self_attn))

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.layers

    @property
    def device(self) -> torch.device:
        """Where the embeddings live: the home device of positions, masks and rotary tables."""
        return self.base.embed_tokens.weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(input_ids.to(self.device))

    def rotary(self, like: torch.Tensor, positions: torch.Tensor, layer_idx: int):
        """(cos, sin) for tokens at rotary ``positions`` (batch, seq) or (3, batch, seq), in the
        dtype and device of ``like``, for layer ``layer_idx``."""
        return self.base.rotary_emb(like, positions)

    def attention_output(self, layer, hidden, rotary, mask, cache, sparse=None) -> torch.Tensor:
        """Attn(Norm(h)) after o_proj: (batch, seq, hidden). DASH scores its norm, ||U_t||.
        ``sparse`` (a ``hf.attention.SparsePrompt``) goes to the attention function, which
        ``hf.attention.prefill_attention_for`` makes the prefill's (block-sparse there)."""
        attention = layer.self_attn
        extra = {} if sparse is None else {"dash_sparse": sparse}
        output, _ = attention(
            hidden_states=layer.input_layernorm(hidden), position_embeddings=rotary,
            attention_mask=mask, **{self.cache_keyword: cache}, **extra,
        )
        return output

    def residual_update(self, layer, output: torch.Tensor) -> torch.Tensor:
        """What the attention sublayer adds to the residual, from its output: U itself here."""
        return output

    def feed_forward(self, layer, hidden) -> torch.Tensor:
        """h + MLP(Norm(h)) for the tokens in ``hidden``."""
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def project(self, layer, normed: torch.Tensor, part: str) -> torch.Tensor:
        """Queries, keys or values (``part`` "q", "k", "v") of the normed residual (batch, seq,
        hidden) -> (batch, heads, seq, head_dim), before rotation."""
        attention = layer.self_attn
        projected = getattr(attention, f"{part}_proj")(normed)
        return projected.view(*normed.shape[:-1], -1, attention.head_dim).transpose(1, 2)

    def queries(self, layer, hidden, rotary) -> torch.Tensor:
        """Rotated attention queries (batch, heads, seq, head_dim) of the residual ``hidden``."""
        states = self.project(layer, layer.input_layernorm(hidden), "q")
        return self.rotate(states, states, *rotary)[0]

    def keys_values(self, layer, hidden, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values (batch, kv_heads, seq, head_dim) of the residual ``hidden``."""
        normed = layer.input_layernorm(hidden)
        keys = self.project(layer, normed, "k")
        return self.rotate(keys, keys, *rotary)[0], self.project(layer, normed, "v")

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states (..., hidden) -> (..., vocab) float32."""
        norm, head = self.base.norm, self.model.lm_head
        normed = norm(last_hidden.to(norm.weight.device))
        return head(normed.to(head.weight.device)).float()


class Qwen3Adapter(PreNormAdapter):
    """Qwen3: RMS norms on each head's queries and keys, before rotation."""

    def project(self, layer, normed, part):
        attention = layer.self_attn
        states = getattr(attention, f"{part}_proj")(normed).view(*normed.shape[:-1], -1, attention.head_dim)
        if part != "v":
            states = getattr(attention, f"{part}_norm")(states)
        return states.transpose(1, 2)


class Phi3Adapter(PreNormAdapter):
    """Phi-3: one fused qkv projection, partial rotary, residual dropouts."""

    rotate = staticmethod(modeling_phi3.apply_rotary_pos_emb)

    def project(self, layer, normed, part):
        attention = layer.self_attn
        q_width = self.config.num_attention_heads * attention.head_dim
        kv_width = self.config.num_key_value_heads * attention.head_dim
        start = {"q": 0, "k": q_width, "v": q_width + kv_width}[part]
        width = q_width if part == "q" else kv_width
        projected = attention.qkv_proj(normed)[..., start:start + width]
        return projected.view(*normed.shape[:-1], -1, attention.head_dim).transpose(1, 2)

    def residual_update(self, layer, output):
        return layer.resid_attn_dropout(output)

    def feed_forward(self, layer, hidden):
        return hidden + layer.resid_mlp_dropout(layer.mlp(layer.post_attention_layernorm(hidden)))


class Gemma3Adapter(Qwen3Adapter):
    """Gemma-3 text: q/k norms (as Qwen3), sandwich norms, per-layer-type rotary tables, final
    logit soft-capping."""

    def rotary(self, like, positions, layer_idx):
        return self.base.rotary_emb(like, positions, self.layer_types[layer_idx])

    def residual_update(self, layer, output):
        # The post-attention RMSNorm rescales every token's update to about the same norm, so
        # DASH scores the output before it (attention_output), whose norm still varies.
        return layer.post_attention_layernorm(output)

    def feed_forward(self, layer, hidden):
        update = layer.mlp(layer.pre_feedforward_layernorm(hidden))
        return hidden + layer.post_feedforward_layernorm(update)

    def logits(self, last_hidden):
        logits = super().logits(last_hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap


ADAPTERS = {
    "llama": PreNormAdapter,
    "mistral": PreNormAdapter,
    "qwen2": PreNormAdapter,
    "qwen3": Qwen3Adapter,
    "phi3": Phi3Adapter,
    "gemma3_text": Gemma3Adapter,
}
# Vision-language models (``*ForConditionalGeneration``): the adapter of their decoder.
VLM_ADAPTERS = {
    "llava": None,  # the text_config's family
    "qwen2_vl": PreNormAdapter,
    "qwen2_5_vl": PreNormAdapter,
    "gemma3": Gemma3Adapter,
}


def _adapter_class(model: nn.Module):
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not hasattr(model, "lm_head"):
        return None
    if model_type in VLM_ADAPTERS and hasattr(getattr(model, "model", None), "language_model"):
        return VLM_ADAPTERS[model_type] or ADAPTERS.get(model.config.get_text_config().model_type)
    return ADAPTERS.get(model_type)


def adapter_for(model: nn.Module) -> PreNormAdapter:
    """The adapter of ``model``'s family; ValueError naming the supported ones otherwise."""
    cls = _adapter_class(model)
    if cls is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); dash_prefill supports "
            f"causal LMs of the families {sorted(ADAPTERS)} (load them with AutoModelForCausalLM) and "
            f"vision-language models {sorted(VLM_ADAPTERS)} (load them with their "
            "*ForConditionalGeneration class)"
        )
    implementation = model.config.get_text_config()._attn_implementation
    if implementation not in ("sdpa", "eager", "flash_attention_2"):
        raise ValueError(
            f"attention implementation {implementation!r} is not supported; load the model with "
            "attn_implementation='sdpa', 'eager' or 'flash_attention_2'"
        )
    return cls(model)


def check_not_offloaded(model: nn.Module) -> None:
    """ValueError if accelerate offloaded weights (meta device): the engine calls sublayers
    directly, so every layer's weights must live on a device."""
    offloaded = next((name for name, p in model.named_parameters() if p.device.type == "meta"), None)
    if offloaded is not None:
        raise ValueError(
            f"weights such as {offloaded} are offloaded (on the meta device); DASH prefill runs "
            "the layers itself and needs every layer on a device: use a device_map without "
            "CPU/disk offloading")

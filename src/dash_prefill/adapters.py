"""Per-family adapters: the only place where model architectures differ.

An adapter splits a decoder layer into its attention update U (the attention sublayer output
that is added to the residual stream) and its feed-forward step, and knows how the family
embeds tokens, builds rotary tables and turns the last hidden state into logits.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
from torch import nn

FULL, SLIDING = "full_attention", "sliding_attention"


@functools.cache
def _cache_keyword(attention_class: type) -> str:
    # transformers renamed `past_key_values` to `cache` during 5.x; accept both.
    parameters = inspect.signature(attention_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class PreNormAdapter:
    """Llama-style pre-norm layer: h' = h + Attn(Norm(h)); h'' = h' + MLP(Norm(h'))."""

    def __init__(self, model: nn.Module):
        self.model = model
        # A vision-language model wraps its decoder: model.model.language_model.
        self.base = getattr(model.model, "language_model", model.model)
        self.config = model.config.get_text_config()
        self.multimodal = self.base is not model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.layers

    def layer_types(self) -> list[str]:
        """Attention type of every layer ("full_attention" or "sliding_attention")."""
        types = getattr(self.config, "layer_types", None)
        if types:
            return list(types)
        sliding = getattr(self.config, "sliding_window", None) is not None
        return [SLIDING if sliding else FULL] * self.config.num_hidden_layers

    def window(self, layer_type: str) -> int | None:
        return self.config.sliding_window if layer_type == SLIDING else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor, layer_type: str):
        """(cos, sin) for tokens at original ``positions`` (batch, seq)."""
        return self.base.rotary_emb(hidden, positions)

    def attention_output(self, layer, hidden, rotary, mask, cache) -> torch.Tensor:
        """Attn(Norm(h)) after o_proj: (batch, seq, hidden). DASH scores its norm, ||U_t||."""
        attention = layer.self_attn
        output, _ = attention(
            hidden_states=layer.input_layernorm(hidden), position_embeddings=rotary,
            attention_mask=mask, **{_cache_keyword(type(attention)): cache},
        )
        return output

    def residual_update(self, layer, output: torch.Tensor) -> torch.Tensor:
        """What the attention sublayer adds to the residual, from its output."""
        return output

    def attention_update(self, layer, hidden, rotary, mask, cache) -> torch.Tensor:
        """U, the update added to the residual: (batch, seq, hidden)."""
        return self.residual_update(layer, self.attention_output(layer, hidden, rotary, mask, cache))

    def _project(self, layer, hidden, part: str) -> torch.Tensor:
        """Queries, keys or values of ``hidden`` (batch, seq, hidden) -> (batch, heads, seq, head_dim)."""
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        if hasattr(attention, "qkv_proj"):  # fused projection (Phi-3): q, then k, then v
            q_width = self.config.num_attention_heads * attention.head_dim
            kv_width = self.config.num_key_value_heads * attention.head_dim
            start = {"q": 0, "k": q_width, "v": q_width + kv_width}[part]
            width = q_width if part == "q" else kv_width
            projected = attention.qkv_proj(normed)[..., start:start + width]
        else:
            projected = getattr(attention, f"{part}_proj")(normed)
        states = projected.view(*hidden.shape[:-1], -1, attention.head_dim)
        if hasattr(attention, f"{part}_norm"):  # Qwen3 / Gemma-3 q/k norms
            states = getattr(attention, f"{part}_norm")(states)
        return states.transpose(1, 2)

    def _rotate(self, layer, states, rotary) -> torch.Tensor:
        cos, sin = rotary
        rotate = sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb
        return rotate(states, states, cos, sin)[0]

    def queries(self, layer, hidden, rotary) -> torch.Tensor:
        """Rotated attention queries (batch, heads, seq, head_dim) of the residual ``hidden``."""
        return self._rotate(layer, self._project(layer, hidden, "q"), rotary)

    def keys_values(self, layer, hidden, rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values (batch, kv_heads, seq, head_dim) of the residual ``hidden``."""
        keys = self._rotate(layer, self._project(layer, hidden, "k"), rotary)
        return keys, self._project(layer, hidden, "v")

    def feed_forward(self, layer, hidden) -> torch.Tensor:
        """h + MLP(Norm(h)) for the tokens in ``hidden``."""
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def logits(self, last_hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final hidden states (..., hidden) -> (..., vocab) float32."""
        norm, head = self.base.norm, self.model.lm_head
        normed = norm(last_hidden.to(norm.weight.device))
        return head(normed.to(head.weight.device)).float()


class Phi3Adapter(PreNormAdapter):
    """Phi-3: fused qkv inside attention (no change needed) and residual dropouts."""

    def residual_update(self, layer, output):
        return layer.resid_attn_dropout(output)

    def feed_forward(self, layer, hidden):
        return hidden + layer.resid_mlp_dropout(layer.mlp(layer.post_attention_layernorm(hidden)))


class Gemma3Adapter(PreNormAdapter):
    """Gemma-3 text: sandwich norms, per-layer-type rotary tables, final logit soft-capping."""

    def rotary(self, hidden, positions, layer_type):
        return self.base.rotary_emb(hidden, positions, layer_type)

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
    "qwen3": PreNormAdapter,
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

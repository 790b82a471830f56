"""An independent slow reference for DASH: the unmodified HF decoder layers on ALL tokens,
with an explicit per-layer mask that hides halted tokens as keys in layers after the start
layer. It shares nothing with the engine but the choice of active tokens."""

import torch
from transformers import DynamicCache

from dash_prefill.adapters import _cache_keyword


def _mask(implementation, allowed, dtype):
    allowed = allowed[:, None]
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


@torch.no_grad()
def _update_hook(layer, captured):
    """Capture the attention update U of a layer (Gemma-3: after its post-attention norm)."""
    if hasattr(layer, "pre_feedforward_layernorm"):
        return layer.post_attention_layernorm.register_forward_hook(
            lambda module, args, output: captured.update(update=output))
    return layer.self_attn.register_forward_hook(
        lambda module, args, output: captured.update(update=output[0]))


def reference_forward(model, input_ids, start_layer, active, attention_mask=None, prompt_len=None,
                      frozen_keys=False, prompt=None):
    """Returns (last-position logits, cache holding every token in every layer).

    active : (batch, seq) bool, the tokens that keep running after ``start_layer``.
    prompt_len : tokens from this index on are decoded ones: they see no halted key even in
        the start layer (whose cache dropped the halted tokens after scoring).
    frozen_keys : halted tokens stay visible in later layers, their hidden state frozen at
        h + U of the start layer (they skip its MLP and everything after).
    prompt : PromptInputs of a vision-language model (embeddings, M-RoPE positions, Gemma-3
        image blocks); the decoder is then ``model.model.language_model``.
    """
    config = model.config.get_text_config()
    base = getattr(model.model, "language_model", model.model)
    batch, seq_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask.bool()
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    query, key = positions[:, :, None], positions[:, None, :]
    causal = (key <= query) & real[:, None, :]
    if prompt is not None and prompt.groups is not None:  # image blocks see themselves whole
        causal |= (prompt.groups[:, :, None] == prompt.groups[:, None, :]) & (prompt.groups[:, :, None] >= 0)
    eye = torch.eye(seq_len, dtype=torch.bool)[None]
    hidden = base.embed_tokens(input_ids) if prompt is None else prompt.embeds
    rope = positions if prompt is None or prompt.rope is None else prompt.rope
    types = getattr(config, "layer_types", None) or (
        ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"]
        * config.num_hidden_layers)
    cache = DynamicCache()
    for idx, layer in enumerate(base.layers):
        allowed = causal.clone()
        if types[idx] == "sliding_attention":
            allowed &= query - key < config.sliding_window
        if frozen_keys:
            pass
        elif idx > start_layer:
            allowed &= active[:, None, :]
        elif idx == start_layer and prompt_len is not None:
            allowed[:, prompt_len:] &= active[:, None, :]
        allowed |= eye
        if config.model_type == "gemma3_text":
            rotary = base.rotary_emb(hidden, rope, types[idx])
        else:
            rotary = base.rotary_emb(hidden, rope)
        captured = {}
        handle = _update_hook(layer, captured)
        before = hidden
        hidden = layer(hidden, attention_mask=_mask(config._attn_implementation, allowed, hidden.dtype),
                       position_embeddings=rotary, position_ids=positions,
                       **{_cache_keyword(type(layer.self_attn)): cache})
        handle.remove()
        if frozen_keys and idx == start_layer:
            frozen = before + captured["update"]
        if frozen_keys and idx >= start_layer:
            hidden = torch.where(active[:, :, None], hidden, frozen)
    logits = model.lm_head(base.norm(hidden[:, -1])).float()
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits, cache

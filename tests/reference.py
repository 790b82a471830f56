"""An independent slow reference for DASH: the unmodified HF decoder layers on ALL tokens,
with an explicit per-layer mask that hides halted tokens as keys in layers after the start
layer. It imports nothing from dash_prefill: it builds its own inputs from the HF model (a VLM's
merged image embeddings and M-RoPE positions from the model's own forward) and is checked
against the model's own forward with every token active (tests/test_reference.py)."""

import inspect
import sys
from fractions import Fraction

import torch
from transformers import DynamicCache


def _mask(implementation, allowed, dtype):
    allowed = allowed[:, None]
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


class _Stop(Exception):
    pass


@torch.no_grad()
def decoder_inputs(model, input_ids, attention_mask=None, **multimodal):
    """What HF's own forward feeds its decoder: (embeddings, rotary positions or None).

    For a VLM the model's forward runs until it calls its language model, whose keyword
    arguments are read there (merged image + text embeddings; Qwen's 3-D M-RoPE positions)."""
    decoder = getattr(model.model, "language_model", None)
    if decoder is None:
        return model.model.embed_tokens(input_ids), None
    seen = {}

    def stop(module, args, kwargs):
        seen.update(kwargs)
        raise _Stop

    handle = decoder.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model.model(input_ids=input_ids, attention_mask=attention_mask, **multimodal)
    except _Stop:
        pass
    finally:
        handle.remove()
    rope = seen.get("position_ids")
    if rope is not None and rope.dim() == 3 and rope.shape[0] == 4:
        rope = rope[1:]  # Qwen2-VL prepends the text positions to its three M-RoPE rows
    return seen["inputs_embeds"], rope


def image_blocks(token_type_ids):
    """Gemma-3: (batch, seq, seq) True where query and key lie in the same run of image tokens."""
    blocks = torch.full(token_type_ids.shape, -1)
    for row in range(token_type_ids.shape[0]):
        block, previous = -1, 0
        for t, kind in enumerate(token_type_ids[row].tolist()):
            if kind == 1 and previous != 1:
                block += 1
            if kind == 1:
                blocks[row, t] = block
            previous = kind
    return (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)


def _layer_types(config):
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    sliding = getattr(config, "sliding_window", None) is not None
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def _cache_keyword(layer):
    parameters = inspect.signature(type(layer).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@torch.no_grad()
def reference_forward(model, input_ids, start_layer, active, attention_mask=None, prompt_len=None,
                      later_gates=(), **multimodal):
    """Returns (last-position logits, cache holding every token in every layer).

    active : (batch, seq) bool, the tokens that keep running after ``start_layer``.
    later_gates : ((layer, active), ...) later gates, each with the (smaller) set of tokens
        that keep running after it.
    prompt_len : tokens from this index on are decoded ones: they see no halted key even in
        the start layer (whose cache dropped the halted tokens after scoring).
    multimodal : a VLM's processor outputs (pixel_values, image_grid_thw, token_type_ids, ...).
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
    if config.model_type == "gemma3_text" and "token_type_ids" in multimodal:
        causal |= image_blocks(multimodal["token_type_ids"])  # image blocks see themselves whole
    eye = torch.eye(seq_len, dtype=torch.bool)[None]
    hidden, rope = decoder_inputs(model, input_ids, attention_mask, **multimodal)
    rope = positions if rope is None else rope
    types = _layer_types(config)
    cache = DynamicCache()
    gates = [(start_layer, active), *later_gates]
    for idx, layer in enumerate(base.layers):
        allowed = causal.clone()
        if types[idx] == "sliding_attention":
            allowed &= query - key < config.sliding_window
        reaching = [a for layer_idx, a in gates if layer_idx < idx]  # tokens that reach this layer
        here = [a for layer_idx, a in gates if layer_idx == idx]  # its cache keeps only these
        if reaching:
            allowed &= reaching[-1][:, None, :]
        if here and prompt_len is not None:
            allowed[:, prompt_len:] &= here[0][:, None, :]
        allowed |= eye
        if config.model_type == "gemma3_text":
            rotary = base.rotary_emb(hidden, rope, types[idx])
        else:
            rotary = base.rotary_emb(hidden, rope)
        hidden = layer(hidden, attention_mask=_mask(config._attn_implementation, allowed, hidden.dtype),
                       position_embeddings=rotary, position_ids=positions, **{_cache_keyword(layer): cache})
    logits = model.lm_head(base.norm(hidden[:, -1])).float()
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits, cache


@torch.no_grad()
def update_norms(model, input_ids, layer, start_layer, active, **later):
    """||U_t|| at ``layer`` of the masked forward with ``active`` from ``start_layer`` (the
    output of the layer's attention module, as ``start_layer_scores``). (batch, seq)."""
    base = getattr(model.model, "language_model", model.model)
    captured = {}
    handle = base.layers[layer].self_attn.register_forward_hook(
        lambda module, args, output: captured.update(u=output[0]))
    try:
        reference_forward(model, input_ids, start_layer, active, **later)
    finally:
        handle.remove()
    return captured["u"].float().norm(dim=-1)


@torch.no_grad()
def start_layer_scores(model, input_ids, start_layer, attention_mask=None, **multimodal):
    """||U_t|| at ``start_layer`` from HF's own forward with every token: the output of the
    layer's attention module (after o_proj, before any post-attention norm). (batch, seq)."""
    base = getattr(model.model, "language_model", model.model)
    captured = {}
    handle = base.layers[start_layer].self_attn.register_forward_hook(
        lambda module, args, output: captured.update(u=output[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, **multimodal)
    finally:
        handle.remove()
    return captured["u"].float().norm(dim=-1)


def top_tokens(scores, halt_ratio, protect_first, protect_last, may_halt=None):
    """The active set, written out for one unpadded row at a time: protected tokens (first
    ``protect_first``, last ``max(protect_last, 1)``, and those ``may_halt`` marks False) stay;
    of the others, the ones with the largest scores stay until ``T - floor(ρ·T)`` tokens remain
    (``may_halt`` given: until ``floor(ρ·count)`` of the tokens that may halt have halted).
    Returns (batch, seq) bool."""
    batch, seq_len = scores.shape
    active = torch.zeros(batch, seq_len, dtype=torch.bool)
    for row in range(batch):
        protected = [t < protect_first or t >= seq_len - max(protect_last, 1) for t in range(seq_len)]
        if may_halt is not None:
            protected = [p or not bool(may_halt[row, t]) for t, p in enumerate(protected)]
            candidates = sum(1 for t in range(seq_len) if bool(may_halt[row, t]) and not protected[t])
            halted = int(Fraction(str(halt_ratio)) * candidates)
        else:
            halted = int(Fraction(str(halt_ratio)) * seq_len)
        keep = max(seq_len - halted, sum(protected))
        order = sorted(range(seq_len), key=lambda t: (not protected[t], -float(scores[row, t])))
        for t in order[:keep]:
            active[row, t] = True
    return active


@torch.no_grad()
def attention_at(model, input_ids, layer):
    """HF's own eager forward with every token, read at decoder layer ``layer`` where HF
    computes it: {"update": the attention module's output U (batch, seq, hidden), "weights":
    its attention probabilities (batch, heads, seq, seq), under HF's own mask (sliding window
    included), "values": its value states (batch, kv_heads, seq, head_dim)}. The model must use
    eager attention (its modeling module's ``eager_attention_forward`` is wrapped for the call)."""
    assert model.config._attn_implementation == "eager", "attention_at reads eager attention"
    base = getattr(model.model, "language_model", model.model)
    attention = base.layers[layer].self_attn
    modeling = sys.modules[type(attention).__module__]
    original, seen = modeling.eager_attention_forward, {}

    def recording(module, query, key, value, *args, **kwargs):
        output, weights = original(module, query, key, value, *args, **kwargs)
        if module is attention:
            seen.update(weights=weights.float(), values=value.float())
        return output, weights

    handle = attention.register_forward_hook(lambda module, args, output: seen.update(update=output[0]))
    modeling.eager_attention_forward = recording
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        modeling.eager_attention_forward = original
        handle.remove()
    return seen


def _ranks(scores):
    """Rank of each score in its row, 1 (lowest) to seq, ties by position, over seq."""
    order = scores.argsort(dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(1, scores.shape[-1] + 1).expand_as(order))
    return ranks.float() / scores.shape[-1]


def policy_scores(model, input_ids, layer, policy, question, seed=0):
    """Each policy's scores (batch, seq) at gate ``layer`` for unpadded rows, written out from
    HF's own eager forward with every token (``attention_at``): ``question`` is the number of
    last queries whose attention the query-aware policies read; ``random`` scores token t by
    the t-th draw of ``torch.rand`` from a generator seeded with ``seed``."""
    batch, seq_len = input_ids.shape
    if policy == "random":
        draws = torch.rand(seq_len, generator=torch.Generator().manual_seed(seed), device="cpu")
        return draws.to(input_ids.device).expand(batch, -1)
    seen = attention_at(model, input_ids, layer)
    norms = seen["update"].float().norm(dim=-1)
    received = seen["weights"][:, :, -question:].mean(dim=2)  # (batch, heads, seq)
    if policy == "dash":
        return norms
    if policy == "attention":
        return received.mean(dim=1)
    if policy == "contribution":
        values = seen["values"].norm(dim=-1)  # (batch, kv_heads, seq)
        return (received * values.repeat_interleave(received.shape[1] // values.shape[1], dim=1)).sum(dim=1)
    if policy == "dash-question":
        return _ranks(norms) * _ranks(received.mean(dim=1))
    raise ValueError(f"no reference for policy {policy!r}")

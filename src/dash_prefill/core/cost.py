"""The cost model of method.md with a model's real dimensions: what speedup to expect.

Linear work (QKV, O, MLP) is proportional to the tokens a layer runs; attention work to the
(query, key) pairs it scores. The start layer itself runs attention on every token (its
update U is the score) and its MLP on the active tokens only. Block-sparse attention (density
< 1) scores ``core.sparse.sparse_fraction`` of the pairs in the full-attention layers before the
start layer (``later_density``: in those after it, gates excepted, over the tokens they run); its
estimate (one query block per layer) is not counted.
"""

from __future__ import annotations

from dash_prefill.core.sparse import sparse_fraction

FULL, SLIDING = "full_attention", "sliding_attention"


def layer_windows(config) -> list[int | None]:
    """Sliding window of every decoder layer (None: full attention), from a (text) config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or [SLIDING if window is not None else FULL] * config.num_hidden_layers
    return [window if layer_type == SLIDING else None for layer_type in types]


def layer_types(config) -> list[str]:
    """Attention type of every decoder layer ("full_attention" or "sliding_attention")."""
    return [FULL if window is None else SLIDING for window in layer_windows(config)]


def _dims(config) -> dict[str, int]:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    return {
        "hidden": config.hidden_size,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "mlp": config.intermediate_size,
        "vocab": config.vocab_size,
        "layers": config.num_hidden_layers,
    }


def attended_pairs(num_tokens: int, window: int | None) -> int:
    """Causal (query, key) pairs of a sequence, limited to a sliding window if given."""
    if window is None or num_tokens <= window:
        return num_tokens * (num_tokens + 1) // 2
    return window * (window + 1) // 2 + (num_tokens - window) * window


def prefill_flops(config, seq_len: int, start_layer: int, kept_fraction: float = 1.0,
                  later_gates=(), density: float = 1.0, later_density: float = 1.0) -> float:
    """FLOPs of a prefill of ``seq_len`` tokens that keeps ``kept_fraction`` from ``start_layer``
    (and, at each later gate ``(layer, kept_fraction)`` of ``later_gates``, fewer), with
    block-sparse attention of ``density`` before ``start_layer`` and ``later_density`` in the
    layers after it that are not gates.

    ``start_layer >= num_layers`` (or ``kept_fraction == 1``) is plain prefill.
    A gate layer runs attention on the tokens entering it and its MLP on those it keeps.
    """
    sparse = sparse_fraction(seq_len, density)
    d = _dims(config)
    key_values = 2 * d["hidden"] * d["head_dim"] * 2 * d["kv_heads"]
    projections = 2 * d["hidden"] * d["head_dim"] * 2 * d["heads"] + key_values
    mlp = 2 * 3 * d["hidden"] * d["mlp"]
    per_pair = 4 * d["heads"] * d["head_dim"]
    gates = {start_layer: kept_fraction, **dict(later_gates)}
    total = 2.0 * d["hidden"] * d["vocab"]  # logits of the last position only
    entering = 1.0  # fraction of the prompt's tokens entering the layer
    for layer, window in enumerate(layer_windows(config)):
        leaving = gates.get(layer, entering)
        tokens_in, tokens_out = (max(1, round(f * seq_len)) for f in (entering, leaving))
        full_pairs = attended_pairs(seq_len, window)
        # Survivors are spread over the original positions: pairs thin out quadratically.
        pairs = (full_pairs if entering == 1.0 else
                 attended_pairs(tokens_in, None) if window is None else full_pairs * entering**2)
        if layer < start_layer and window is None:
            pairs *= sparse
        elif layer > start_layer and layer not in gates and window is None:
            pairs *= sparse_fraction(tokens_in, later_density)
        total += projections * tokens_in + per_pair * pairs + mlp * tokens_out
        entering = leaving
    return total


def ideal_speedup(config, seq_len: int, start_layer: int, kept_fraction: float,
                  later_gates=(), density: float = 1.0, later_density: float = 1.0) -> float:
    """FLOPs(plain prefill) / FLOPs(DASH) for this model and prompt length."""
    num_layers = _dims(config)["layers"]
    full = prefill_flops(config, seq_len, num_layers)
    return full / prefill_flops(config, seq_len, start_layer, kept_fraction, later_gates, density, later_density)

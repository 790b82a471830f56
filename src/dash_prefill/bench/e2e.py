"""End to end: time to first token, decode ms per token and total time for N new tokens.

Every method is a function ``(model, input_ids, n) -> generated ids (batch, n)``, greedy, with
stopping at EOS switched off, so every method decodes exactly ``n`` tokens. TTFT is the time of
generating 1 token; total is the time of generating ``n``; decode ms/token = (total - TTFT)/(n - 1).
Beside each row: the memory-bandwidth floor of one decoded token, (weight bytes + KV-cache bytes
at that length) / bandwidth.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import statistics
import time
from typing import Callable

import torch

from ..config import DashConfig, start_layer_index
from ..generation import generate
from ..hf_generate import halting
from .shapes import kv_bytes

logger = logging.getLogger(__name__)

# Peak memory bandwidth (bytes/s) by a substring of the GPU's name; first match wins.
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}


class _IdsTokenizer:
    """What :func:`dash_prefill.generate` needs of a tokenizer when prompts are token ids."""

    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def bandwidth_for(device: torch.device, given: float | None = None) -> float | None:
    """``given`` if set; else the table's value for the GPU's name; None on CPU or an unknown GPU."""
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in BANDWIDTH.items() if key in name), None)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _hf(cache_implementation: str | None = None) -> Callable:
    def run(model, ids, n):
        extra = {"cache_implementation": cache_implementation} if cache_implementation else {}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0, **extra)
        return out[:, ids.shape[1]:]
    return run


def _dash(config: DashConfig, static: bool = False) -> Callable:
    def run(model, ids, n):
        # A mask with the ids: they are used as given (no round trip through Python lists).
        result = generate(model, _IdsTokenizer(), ids, config, max_new_tokens=n, eos_token_id=[],
                          attention_mask=torch.ones_like(ids), static_decode=static)
        return torch.tensor(result.token_ids)
    return run


def _dash_hf(config: DashConfig) -> Callable:
    def run(model, ids, n):
        with halting(model, config):
            return _hf()(model, ids, n)
    return run


def methods(settings: list[tuple[int | float, float]], num_layers: int) -> list[tuple[str, float, int, Callable]]:
    """(method, halt_ratio, start_layer, fn): hf, hf-static, then dash, dash-static, dash-hf at
    ρ=0 (the first setting's start) and at every setting. Protection as in the TTFT bench."""
    first = start_layer_index(settings[0][0], num_layers)
    rows = [("hf", 0.0, num_layers, _hf()), ("hf-static", 0.0, num_layers, _hf("static"))]
    for start, ratio in [(first, 0.0)] + [(start_layer_index(s, num_layers), r) for s, r in settings]:
        config = DashConfig(halt_ratio=ratio, start_layer=start, protect_first=4, protect_last=64)
        rows += [("dash", ratio, start, _dash(config)), ("dash-static", ratio, start, _dash(config, True)),
                 ("dash-hf", ratio, start, _dash_hf(config))]
    return rows


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, model, ids, n: int, warmup: int, repeats: int) -> tuple[list[float], torch.Tensor]:
    """Wall seconds of ``repeats`` calls after ``warmup`` calls, CUDA synchronised around each."""
    for _ in range(warmup):
        fn(model, ids, n)
    seconds = []
    for _ in range(repeats):
        _synchronize(ids.device)
        begin = time.perf_counter()
        tokens = fn(model, ids, n)
        _synchronize(ids.device)
        seconds.append(time.perf_counter() - begin)
    return seconds, tokens


def _time_method(fn, model, ids, n: int, warmup: int, repeats: int) -> dict:
    first, _ = _seconds(fn, model, ids, 1, warmup, repeats)
    total, tokens = _seconds(fn, model, ids, n, warmup, repeats) if n > 1 else (first, None)
    if tokens is None:
        tokens = fn(model, ids, 1)
    ttft, whole = statistics.median(first), statistics.median(total)
    ids_list = tokens[0].tolist()  # batch 1
    return {"ttft_s": ttft, "ttft_min_s": min(first), "ttft_max_s": max(first),
            "total_s": whole, "total_min_s": min(total), "total_max_s": max(total),
            "decode_ms_per_token": (whole - ttft) / (n - 1) * 1e3 if n > 1 else None,
            "generated_tokens": len(ids_list), "token_ids": ids_list,
            "tokens_sha1": hashlib.sha1(repr(ids_list).encode()).hexdigest()[:12]}


def run_e2e(name: str, model, lengths: list[int], new_tokens: list[int], settings, device: torch.device,
            warmup: int = 1, repeats: int = 3, seed: int = 0, bandwidth: float | None = None) -> list[dict]:
    """One row per (length, N, method, setting) for ``model`` (batch 1, seeded random prompt)."""
    from .timing import random_ids

    config = model.config.get_text_config()
    weights = weight_bytes(model)
    element = next(model.parameters()).element_size()
    rows = []
    for length in lengths:
        ids = random_ids(1, length, config.vocab_size, device, seed)
        kv = kv_bytes(config, 1, length, element)
        floor = (weights + kv) / bandwidth * 1e3 if bandwidth else None
        for n in new_tokens:
            for method, ratio, start, fn in methods(settings, config.num_hidden_layers):
                row = {"record": "row", "arch": name, "batch": 1, "length": length, "new_tokens": n,
                       "method": method, "halt_ratio": ratio, "start_layer": start, "status": "ok",
                       "weight_bytes": weights, "kv_cache_bytes": kv, "floor_ms_per_token": floor}
                try:
                    with torch.inference_mode():
                        row.update(_time_method(fn, model, ids, n, warmup, repeats))
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "oom"
                    logger.warning("out of memory: %s %s at length %d", name, method, length)
                except Exception as error:  # noqa: BLE001 - a static cache that cannot run is a row status
                    if not method.endswith("-static"):
                        raise
                    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                    row["status"] = f"error: {type(error).__name__}: {first_line}"[:160]
                    logger.warning("%s %s ρ=%s failed: %s", name, method, ratio, first_line)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
        del ids
    return rows

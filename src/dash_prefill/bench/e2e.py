"""End to end: time to first token, decode ms per token and total time for N new tokens.

Every method is a function ``(model, input_ids, n) -> generated ids (batch, n)``, greedy, with
stopping at EOS switched off, so every method decodes exactly ``n`` tokens. One run of the largest
N serves every N: a :class:`Clock` notes when the 1st and each N-th token is reached (a host sync
at those tokens only). TTFT is the time to the 1st token, total the time to the N-th; decode
ms/token = (total - TTFT)/(N - 1).
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
from transformers import StaticCache
from transformers.generation.logits_process import LogitsProcessorList

from dash_prefill.hf.adapters import generate_cache_keyword
from dash_prefill.core.config import DashConfig, start_layer_index
from dash_prefill.hf.generation import generate
from dash_prefill.hf.halting import halting
from dash_prefill.bench.shapes import kv_bytes
from dash_prefill.bench.timing import PROTECT_FIRST, PROTECT_LAST

logger = logging.getLogger(__name__)

# Peak memory bandwidth (bytes/s) by a substring of the GPU's name; first match wins.
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}


class _IdsTokenizer:
    """What :func:`dash_prefill.generate` needs of a tokenizer when prompts are token ids."""

    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


class Clock:
    """The times at which the generated token counts in ``marks`` are reached, in one run.

    Seen by ``dp.generate`` as a streamer (``put``: the prompt, then each token) and by HF
    ``generate`` as a logits processor (called once per token, before choosing it, with no
    device-to-host copy, which HF's streamer protocol would add every token). The GPU is
    synchronised only at a mark, so a run costs len(marks) host syncs.
    """

    def __init__(self, marks: list[int], device: torch.device):
        self.marks, self.device = set(marks), device
        self.count, self.times, self.prompt_seen, self.begin = 0, {}, False, 0.0

    def start(self) -> None:
        _synchronize(self.device)
        self.count, self.times, self.prompt_seen, self.begin = 0, {}, False, time.perf_counter()

    def _tick(self) -> None:
        self.count += 1
        if self.count in self.marks:
            _synchronize(self.device)
            self.times[self.count] = time.perf_counter() - self.begin

    def put(self, value) -> None:  # streamer: the prompt first, then one token per call
        if self.prompt_seen:
            self._tick()
        self.prompt_seen = True

    def end(self) -> None:
        pass

    def __call__(self, input_ids, scores):  # logits processor: token ``count + 1`` is chosen next
        self._tick()
        return scores

    def stop(self) -> dict[int, float]:
        """Seconds from :meth:`start` to each mark reached; the last mark is the run's end."""
        _synchronize(self.device)
        self.times[max(self.marks)] = time.perf_counter() - self.begin
        return self.times


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


class _HF:
    """HF ``generate``, greedy, exactly ``n`` tokens. ``static``: HF's compiled fast path, a
    ``StaticCache`` (which ``generate`` compiles the decoding step for), sized once per prompt
    length for the most new tokens and reset per call, so one compilation serves every call."""

    def __init__(self, static: bool = False, slots: int = 0):
        self.static, self.slots, self.cache = static, slots, None

    def __call__(self, model, ids, n, clock=None):
        extra = {"logits_processor": LogitsProcessorList([clock])} if clock is not None else {}
        if self.static:
            if self.cache is None:
                self.cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + self.slots)
            self.cache.reset()
            extra[generate_cache_keyword(model)] = self.cache
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0, **extra)
        return out[:, ids.shape[1]:]


def _dash(config: DashConfig, static: bool | str = False) -> Callable:
    def run(model, ids, n, clock=None):
        # A mask with the ids: they are used as given (no round trip through Python lists).
        result = generate(model, _IdsTokenizer(), ids, config, max_new_tokens=n, eos_token_id=[],
                          attention_mask=torch.ones_like(ids), static_decode=static, streamer=clock)
        return torch.tensor(result.token_ids)
    return run


def _dash_hf(config: DashConfig) -> Callable:
    plain = _HF()

    def run(model, ids, n, clock=None):
        with halting(model, config):
            return plain(model, ids, n, clock)
    return run


METHODS = ("hf", "hf-static", "dash", "dash-static", "dash-compiled", "dash-hf")
# Methods whose first call at a new cache shape compiles or records: one untimed call per length, for
# the most new tokens (the timed runs reuse its cache buffers), first.
COMPILING = ("hf-static", "dash-compiled")


def methods(settings: list[tuple[int | float, float]], num_layers: int, slots: int = 0,
            only: tuple[str, ...] = METHODS) -> list[tuple[str, float, int, Callable]]:
    """(method, halt_ratio, start_layer, fn): hf, hf-static (its cache sized for ``slots`` new
    tokens), then dash, dash-static (a CUDA graph of the step), dash-compiled (torch.compile,
    then the graph), dash-hf at ρ=0 (the first setting's start) and at every setting; those
    named in ``only``. Protection as in the TTFT bench."""
    first = start_layer_index(settings[0][0], num_layers)
    rows = [("hf", 0.0, num_layers, _HF()), ("hf-static", 0.0, num_layers, _HF(static=True, slots=slots))]
    for start, ratio in [(first, 0.0)] + [(start_layer_index(s, num_layers), r) for s, r in settings]:
        config = DashConfig(halt_ratio=ratio, start_layer=start, protect_first=PROTECT_FIRST,
                            protect_last=PROTECT_LAST)
        rows += [("dash", ratio, start, _dash(config)), ("dash-static", ratio, start, _dash(config, True)),
                 ("dash-compiled", ratio, start, _dash(config, "compiled")),
                 ("dash-hf", ratio, start, _dash_hf(config))]
    return [row for row in rows if row[0] in only]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_method(fn, model, ids, new_tokens: list[int], warmup: int, repeats: int) -> list[dict]:
    """One dict per N in ``new_tokens``: TTFT, total and decode ms/token, median over ``repeats``
    runs of the largest N (each N's total is the time its N-th token was reached in that run),
    after ``warmup`` untimed runs of 2 tokens."""
    for _ in range(warmup):
        fn(model, ids, 2)
    clock, runs = Clock([1, *new_tokens], ids.device), []
    for _ in range(repeats):
        clock.start()
        tokens = fn(model, ids, max(new_tokens), clock)
        runs.append(clock.stop())
    ids_list = tokens[0].tolist()  # batch 1
    out = []
    for n in new_tokens:
        first, total = [run[1] for run in runs], [run[n] for run in runs]
        ttft, whole = statistics.median(first), statistics.median(total)
        out.append({"ttft_s": ttft, "ttft_min_s": min(first), "ttft_max_s": max(first),
                    "total_s": whole, "total_min_s": min(total), "total_max_s": max(total),
                    "decode_ms_per_token": (whole - ttft) / (n - 1) * 1e3 if n > 1 else None,
                    "generated_tokens": min(n, len(ids_list)), "token_ids": ids_list[:n],
                    "tokens_sha1": hashlib.sha1(repr(ids_list[:n]).encode()).hexdigest()[:12]})
    return out


def run_e2e(name: str, model, lengths: list[int], new_tokens: list[int], settings, device: torch.device,
            warmup: int = 1, repeats: int = 3, seed: int = 0, bandwidth: float | None = None,
            only: tuple[str, ...] = METHODS, on_length: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """One row per (length, N, method in ``only``, setting) for ``model`` (batch 1, seeded random prompt).

    Each method is run ``repeats`` times per length for the largest N (:func:`_time_method`).
    Before any timing every method runs once on a 256-token prompt (CUDA context, kernels,
    graph capture, compilation: its time is the row's ``first_call_s``); per length, the
    compiling ones (hf-static, dash-compiled) then run once untimed for the most new tokens,
    whose cache buffers the timed runs reuse (compilation and graph recording for a new cache
    shape: the row's ``shape_call_s``), and each method runs ``warmup`` untimed 2-token calls.
    ``on_length(rows)`` is called with the rows so far after each length (to save partial results).
    """
    from dash_prefill.bench.timing import random_ids

    config = model.config.get_text_config()
    weights = weight_bytes(model)
    element = next(model.parameters()).element_size()
    new_tokens = sorted(set(new_tokens))
    with torch.inference_mode():
        short = random_ids(1, min(256, min(lengths)), config.vocab_size, device, seed)
        first_call = {}
        for method, ratio, _, fn in methods(settings, config.num_hidden_layers, 2, only):
            began = time.perf_counter()
            try:
                fn(model, short, 2)
            except Exception:  # noqa: BLE001 - a static path that cannot run fails again in its row
                if not _may_fail(method):
                    raise
            _synchronize(device)
            first_call[method, ratio] = time.perf_counter() - began
    rows = []
    for length in lengths:
        ids = random_ids(1, length, config.vocab_size, device, seed)
        kv = kv_bytes(config, 1, length, element)
        floor = (weights + kv) / bandwidth * 1e3 if bandwidth else None
        by_method = []
        for method, ratio, start, fn in methods(settings, config.num_hidden_layers, max(new_tokens), only):
            base = {"record": "row", "arch": name, "batch": 1, "length": length, "method": method,
                    "halt_ratio": ratio, "start_layer": start, "status": "ok", "weight_bytes": weights,
                    "kv_cache_bytes": kv, "floor_ms_per_token": floor,
                    "first_call_s": first_call.get((method, ratio))}
            try:
                with torch.inference_mode():
                    if method in COMPILING:  # compiles and records for the timed runs' cache shapes
                        began = time.perf_counter()
                        fn(model, ids, max(new_tokens))
                        _synchronize(device)
                        base["shape_call_s"] = time.perf_counter() - began
                    timed = _time_method(fn, model, ids, new_tokens, warmup, repeats)
            except torch.cuda.OutOfMemoryError:
                timed = [{"status": "oom"}] * len(new_tokens)
                logger.warning("out of memory: %s %s at length %d", name, method, length)
            except Exception as error:  # noqa: BLE001 - a static cache that cannot run is a row status
                if not _may_fail(method):
                    raise
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                timed = [{"status": f"error: {type(error).__name__}: {first_line}"[:160]}] * len(new_tokens)
                logger.warning("%s %s ρ=%s failed: %s", name, method, ratio, first_line)
            by_method.append([{**base, "new_tokens": n, **t} for n, t in zip(new_tokens, timed)])
            last = by_method[-1][-1]
            logger.info("%s T=%d %s ρ=%s: TTFT %s s, %s ms/token, total %s s for %d tokens", name, length,
                        method, ratio, _fmt(last.get("ttft_s")), _fmt(last.get("decode_ms_per_token")),
                        _fmt(last.get("total_s")), last["new_tokens"])
            if isinstance(fn, _HF):
                fn.cache = None  # a static cache of the whole length: not kept beside the next method
            del fn
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows += [method_rows[i] for i in range(len(new_tokens)) for method_rows in by_method]
        del ids
        if on_length is not None:
            on_length(rows)
    return rows


def _may_fail(method: str) -> bool:
    """Static caches and compiled steps may not run on a model; their rows say why."""
    return method.endswith(("-static", "-compiled"))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"

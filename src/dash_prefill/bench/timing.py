"""Time to first token, measured call by call: prefill plus the first token's logits.

Every method is a function ``(model, input_ids) -> (logits, cache, kept_fraction)`` timed with
the same discipline: warm-up calls, then repeated calls each bracketed by CUDA events (or
``time.perf_counter`` on CPU) with a synchronisation after, and the peak memory of each call.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from dash_prefill import DashConfig, prefill
from dash_prefill.hf.generation import plain_prefill
from dash_prefill.core.policy import prompt_kept
from dash_prefill.bench.hooks import hooks_prefill

Method = Callable[[torch.nn.Module, torch.Tensor], tuple]


@dataclass(frozen=True)
class Timing:
    """Seconds per call over the repeats, and memory of the measured calls (bytes; None on CPU).

    peak_bytes is the largest allocation peak of a call including the weights and inputs;
    peak_over_weights_bytes subtracts what was allocated before the call (weights, inputs).
    """

    median_s: float
    min_s: float
    max_s: float
    peak_bytes: int | None
    peak_over_weights_bytes: int | None
    kv_cache_bytes: int
    kept_fraction: float


def random_ids(batch: int, length: int, vocab_size: int, device, seed: int = 0) -> torch.Tensor:
    """Seeded random prompt ids (batch, length), no padding, drawn on the CPU then moved."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator, device="cpu").to(device)


def cache_bytes(cache) -> int:
    """Bytes of keys plus values over every layer of a transformers cache."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
               if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4)


def plain_method(model, input_ids):
    """The model's own forward, computing only the last position's logits (the fair baseline)."""
    logits, cache = plain_prefill(model, input_ids)
    return logits, cache, 1.0


# The benchmark's protection: the first 4 tokens and the last 64 (the question window of
# query-aware policies).
PROTECT_FIRST, PROTECT_LAST = 4, 64


def kept_fraction(length: int, halt_ratio: float) -> float:
    """Fraction of a ``length``-token prompt the engine keeps at ``halt_ratio`` under that protection."""
    return prompt_kept(length, halt_ratio, PROTECT_FIRST, PROTECT_LAST) / length


def dash_method(halt_ratio: float, start_layer: int, policy: str = "dash", pool: int = 1,
                pool_offset: int = 0, later_gates: tuple = (), score: str = "absolute",
                density: float = 1.0) -> Method:
    """This package's engine with the benchmark's protection (first 4, last 64 tokens: the
    question window of query-aware policies)."""
    config = DashConfig(halt_ratio=halt_ratio, start_layer=start_layer, protect_first=PROTECT_FIRST,
                        protect_last=PROTECT_LAST, policy=policy, pool=pool, pool_offset=pool_offset,
                        later_gates=later_gates, score=score, density=density)

    def run(model, input_ids):
        result = prefill(model, input_ids, config)
        return result.logits, result.cache, max(result.stats.kept_tokens) / input_ids.shape[1]
    return run


def hooks_method(halt_ratio: float, start_layer: int) -> Method:
    """The kvpress-style hooks re-implementation with the same selection and protection."""
    def run(model, input_ids):
        logits, cache = hooks_prefill(model, input_ids, halt_ratio, start_layer, PROTECT_FIRST, PROTECT_LAST)
        length = input_ids.shape[1]
        return logits, cache, kept_fraction(length, halt_ratio)
    return run


class _Clock:
    """One measured call: a CUDA event pair on one GPU; on several GPUs, wall time between
    synchronisations of all of them (events on one device cannot see the others' work);
    perf_counter on the CPU. Peak memory is summed over the GPUs."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.gpus = range(torch.cuda.device_count()) if self.cuda else range(0)

    def _synchronize(self) -> None:
        for gpu in self.gpus:
            torch.cuda.synchronize(gpu)

    def __enter__(self):
        if self.cuda:
            self._synchronize()
            for gpu in self.gpus:
                torch.cuda.reset_peak_memory_stats(gpu)
            self.before = sum(torch.cuda.memory_allocated(gpu) for gpu in self.gpus)
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.begin = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self._synchronize()
            wall = time.perf_counter() - self.begin
            self.seconds = self.start.elapsed_time(self.end) / 1000.0 if len(self.gpus) == 1 else wall
            self.peak = sum(torch.cuda.max_memory_allocated(gpu) for gpu in self.gpus)
        else:
            self.seconds = time.perf_counter() - self.begin
            self.peak = self.before = None
        return False


@torch.inference_mode()
def measure(method: Method, model, input_ids: torch.Tensor, warmup: int = 2, repeats: int = 5) -> Timing:
    """Median/min/max seconds of ``repeats`` calls after ``warmup`` calls, and their peak memory."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    for _ in range(warmup):
        method(model, input_ids)  # the output is dropped at once: nothing stays alive between calls
    seconds, peaks, overs = [], [], []
    kv_bytes, kept_fraction = 0, 1.0
    device = input_ids["input_ids"].device if isinstance(input_ids, dict) else input_ids.device
    for _ in range(repeats):
        with _Clock(device) as clock:
            logits, cache, kept_fraction = method(model, input_ids)
        kv_bytes = cache_bytes(cache)
        del logits, cache
        seconds.append(clock.seconds)
        if clock.peak is not None:
            peaks.append(clock.peak)
            overs.append(clock.peak - clock.before)
    return Timing(
        median_s=statistics.median(seconds), min_s=min(seconds), max_s=max(seconds),
        peak_bytes=max(peaks) if peaks else None, peak_over_weights_bytes=max(overs) if overs else None,
        kv_cache_bytes=kv_bytes, kept_fraction=kept_fraction,
    )


# Repeats spread wider than this fraction of their median are reported as untrustworthy.
SPREAD_LIMIT = 0.25


def spread(seconds: list[float]) -> float:
    """(max - min) / median of repeated timings: 0 for perfectly steady repeats."""
    return (max(seconds) - min(seconds)) / statistics.median(seconds)


def _busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has used so far (Linux /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Cores kept busy by *other* processes during a with-block: ``cores`` (None where unknown).

    The machine's busy CPU time minus this process's, over the wall time.
    """

    def __enter__(self):
        self.cores = None
        self._start = (_busy_cpu_seconds(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc):
        busy, own, wall = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        if busy is not None and self._start[0] is not None and wall > self._start[2]:
            other = (busy - self._start[0]) - (own - self._start[1])
            self.cores = max(0.0, other / (wall - self._start[2]))
        return False


def trust_warnings(timings: dict[str, list[float]], other_cores: float | None = None,
                   threads: int | None = None) -> list[str]:
    """One line per reason not to trust the timings: repeats spread wider than SPREAD_LIMIT,
    or other processes competing for the cores this process's threads use. ``--threads 1`` is
    advised only where more threads ran."""
    threads = threads or torch.get_num_threads()
    fewer = "--threads 1 and " if threads > 1 else ""
    lines = []
    for name, seconds in timings.items():
        if len(seconds) > 1 and spread(seconds) > SPREAD_LIMIT:
            lines.append(f"{name}: the repeats spread over {spread(seconds):.0%} of their median "
                         f"({min(seconds):.3g}-{max(seconds):.3g} s); do not trust this number: rerun "
                         f"with {fewer}more --repeats on a quiet machine")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if other_cores is not None and other_cores >= 0.5 and other_cores + threads > cores:
        advice = "pass --threads 1 or rerun" if threads > 1 else "rerun"
        lines.append(f"other processes kept {other_cores:.1f} of {cores} CPU cores busy while timing "
                     f"({threads} thread{'s' if threads > 1 else ''} here); times are slower and noisier "
                     f"than on a quiet machine: {advice} when the machine is idle")
    return lines

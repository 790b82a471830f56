"""The benchmark grid: every method on the same inputs, one row per (model, batch, length, method)."""

from __future__ import annotations

import gc
import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from dash_prefill.core.config import DashConfig, gates_label, policy_config, start_layer_index
from dash_prefill.core.cost import ideal_speedup
from dash_prefill.bench.timing import Timing, dash_method, hooks_method, kept_fraction, measure, plain_method, random_ids

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A model to benchmark: its name in the table and how to build or load it."""

    name: str
    load: Callable[[], torch.nn.Module]


@dataclass(frozen=True)
class BenchPlan:
    """What to run. ``settings`` are (start_layer, halt_ratio) pairs, or (start_layer, halt_ratio,
    later_gates) triples; a float start is a fraction."""

    targets: list[Target]
    lengths: list[int]
    batches: list[int]
    settings: list[tuple]
    device: torch.device
    warmup: int = 2
    repeats: int = 5
    hooks: bool = True
    sync_check: bool = False
    seed: int = 0
    policies: tuple[str, ...] = ("dash",)  # NAME[-rel][/pPOOL[oOFFSET]]; rows are labelled with it
    densities: tuple[float, ...] = (1.0,)  # attention density before the first gate (rows: NAME~D)


def later_gates(setting: tuple) -> tuple[tuple[int | float, float], ...]:
    """The gates after the first of a setting: its third element, if it has one."""
    return tuple(setting[2]) if len(setting) > 2 else ()


def _methods(plan: BenchPlan, num_layers: int) -> list[tuple[str, float, int, tuple, float, Callable]]:
    """(method, halt_ratio, start_layer, later gates as (layer, halt_ratio), density, fn) in run
    order: plain, dash at ρ=0, then each setting at each density (hooks for dense one-gate
    settings only)."""
    first_start = start_layer_index(plan.settings[0][0], num_layers)
    methods = [("plain", 0.0, num_layers, (), 1.0, plain_method),
               ("dash", 0.0, first_start, (), 1.0, dash_method(0.0, first_start))]
    for setting in plan.settings:
        start, ratio, gates = setting[0], setting[1], later_gates(setting)
        (index, _), *layers = DashConfig(halt_ratio=ratio, start_layer=start,
                                         later_gates=gates).resolve_gates(num_layers)
        for density in plan.densities:
            for policy in plan.policies:
                config = policy_config(policy, ratio, index, layers)
                name = policy + gates_label(layers) + (f"~{float(density)}" if density < 1.0 else "")
                methods.append((name, ratio, index, tuple(layers), density,
                                dash_method(ratio, index, config.policy, config.pool, config.pool_offset,
                                            later_gates=tuple(layers), score=config.score, density=density)))
        if plan.hooks and not gates:
            methods.append(("hooks", ratio, index, (), 1.0, hooks_method(ratio, index)))
    return methods


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(name, length, batch, method, ratio, start, timing: Timing | None, status, config, gates=(),
         density: float = 1.0) -> dict:
    """One table row; ``gates``: the later gates as (layer, halt_ratio), whose kept fractions the
    ideal counts as the engine keeps them (the protected tokens, then the top of the rest)."""
    row = {"record": "row", "arch": name, "length": length, "batch": batch, "method": method,
           "halt_ratio": ratio, "start_layer": start, "status": status,
           "median_s": None, "min_s": None, "max_s": None, "peak_bytes": None,
           "peak_over_weights_bytes": None, "kv_cache_bytes": None, "kept_fraction": None,
           "ideal_speedup": None}
    if gates:
        row["later_gates"] = [list(gate) for gate in gates]
    if timing is not None:
        row.update({k: getattr(timing, k) for k in ("median_s", "min_s", "max_s", "peak_bytes",
                                                    "peak_over_weights_bytes", "kv_cache_bytes",
                                                    "kept_fraction")})
        fractions = [(layer, kept_fraction(length, r)) for layer, r in gates]
        first = timing.kept_fraction if not gates else kept_fraction(length, ratio)
        row["ideal_speedup"] = 1.0 if method == "plain" else ideal_speedup(
            config, length, start, first, later_gates=fractions, density=density)
    return row


def _add_speedups(rows: list[dict]) -> None:
    """measured speedup = plain / this; efficiency = measured / ideal; dash over hooks."""
    plain = {(r["arch"], r["length"], r["batch"]): r["median_s"] for r in rows if r["method"] == "plain"}
    hooks = {(r["arch"], r["length"], r["batch"], r["halt_ratio"], r["start_layer"]): r["median_s"]
             for r in rows if r["method"] == "hooks"}
    for r in rows:
        base = plain.get((r["arch"], r["length"], r["batch"]))
        ok = r["median_s"] is not None
        r["speedup"] = base / r["median_s"] if ok and base else None
        r["efficiency"] = r["speedup"] / r["ideal_speedup"] if r["speedup"] and r["ideal_speedup"] else None
        other = hooks.get((r["arch"], r["length"], r["batch"], r["halt_ratio"], r["start_layer"]))
        r["speedup_over_hooks"] = other / r["median_s"] if r["method"] == "dash" and ok and other else None


def _count_syncs(method, model, input_ids) -> int:
    """Host synchronisations of one call, as reported by CUDA's sync debug mode."""
    with torch.inference_mode():
        method(model, input_ids)  # warm-up: lazy one-time initialisation is not the method's cost
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.inference_mode():
                method(model, input_ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Only the sync warnings: the first use of the debug mode in a process also warns that it is
    # a prototype ("... does not yet detect all synchronizing operations"), which earlier
    # tables counted as one sync of whichever method was checked first (plain).
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


def _sync_check(name, model, input_ids, methods) -> list[dict]:
    """One call of every method under CUDA's sync debug mode: how often each syncs the host."""
    records = []
    for method, ratio, start, _, _, fn in methods:
        try:
            count = _count_syncs(fn, model, input_ids)
        except (torch.cuda.OutOfMemoryError, NotImplementedError) as error:
            logger.warning("sync check of %s %s skipped: %s", name, method, error)
            continue
        finally:
            _free(input_ids.device)
        records.append({"record": "sync_check", "arch": name, "length": input_ids.shape[1],
                        "batch": input_ids.shape[0], "method": method, "halt_ratio": ratio,
                        "start_layer": start, "sync_warnings": count})
        logger.info("sync check %s %s ρ=%s: %d host synchronisations", name, method, ratio, count)
    return records


def _measure_or_skip(plan, fn, model, ids, label) -> tuple[Timing | None, str]:
    """Measure one method; out of memory (or an unsupported input) is a row status, not a crash."""
    timing, status = None, "ok"
    try:
        timing = measure(fn, model, ids, plan.warmup, plan.repeats)
    except torch.cuda.OutOfMemoryError:
        status = "oom"
        logger.warning("out of memory: %s at batch %d, length %d", label, *ids.shape)
    except NotImplementedError as error:
        status = "unsupported"
        logger.warning("%s: %s", label, error)
    _free(plan.device)  # after the except clause, so the traceback no longer holds tensors
    return timing, status


def run_bench(plan: BenchPlan, on_point=None) -> tuple[list[dict], list[dict]]:
    """Run every method of ``plan`` on the same seeded inputs; ``on_point(rows, syncs)`` after each
    (model, batch, length) with the rows so far (to save partial results of a long run).

    Returns
    -------
    rows : one dict per (model, batch, length, method, setting), with timings and speedups.
    sync_records : host synchronisations per method (``plan.sync_check`` on CUDA only).
    """
    if plan.sync_check and plan.device.type != "cuda":
        logger.warning("--sync-check needs CUDA; skipped on %s", plan.device)
    rows: list[dict] = []
    syncs: list[dict] = []
    points = len(plan.targets) * len(plan.batches) * len(plan.lengths)
    per_point = 2 + len(plan.settings) * (len(plan.densities) * len(plan.policies) + (1 if plan.hooks else 0))
    progress = tqdm(total=points * per_point, desc="bench", unit="run")
    for target in plan.targets:
        model = target.load()
        config = model.config.get_text_config()
        methods = _methods(plan, config.num_hidden_layers)
        checked = not (plan.sync_check and plan.device.type == "cuda")
        for batch in plan.batches:
            for length in plan.lengths:
                ids = random_ids(batch, length, config.vocab_size, plan.device, plan.seed)
                if not checked:
                    syncs += _sync_check(target.name, model, ids, methods)
                    checked = True
                for method, ratio, start, gates, density, fn in methods:
                    progress.set_postfix_str(f"{target.name} b={batch} T={length} {method} ρ={ratio}")
                    timing, status = _measure_or_skip(plan, fn, model, ids, f"{target.name} {method}")
                    rows.append(_row(target.name, length, batch, method, ratio, start, timing, status, config,
                                     gates, density))
                    progress.update(1)
                del ids
                if on_point is not None:
                    done = [dict(row) for row in rows]
                    _add_speedups(done)
                    on_point(done, syncs)
        del model
        _free(plan.device)
    progress.close()
    _add_speedups(rows)
    return rows, syncs

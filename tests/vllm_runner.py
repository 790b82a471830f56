"""Runs the real vLLM engine for tests/test_vllm.py, in a process of its own (vLLM sets threads,
signal handlers and NUMA binding for its process). usage: python vllm_runner.py SPEC.json OUT.json

SPEC: {"engines": [{"name", "model", "dtype", "dash" (DashConfig fields, or null: vLLM's own model),
"max_model_len", "max_tokens", "alone": [ids, ...], "mixed": {"short": [ids, ...], "long": [ids, ...],
"steps_before": n}}]}. OUT: {name: {"alone": [{"tokens", "kept"}], "mixed": {"short": [tokens], "long": [tokens]}}
or {"error": "..."}}: "kept" lists, per prompt, the prompt indices kept at each gate.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: apply_model reads the model
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def run_engine(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    from dash_prefill.core.config import DashConfig
    from dash_prefill.vllm import engine_args

    options = dict(model=spec["model"], dtype=spec.get("dtype", "float32"), max_model_len=spec.get("max_model_len", 2048),
                   seed=0, enforce_eager=True)
    try:
        if spec.get("dash") == {}:  # the model's recommended setting, chosen in vLLM's process
            options.update(engine_args(spec["model"], None))
            options["hf_overrides"]["dash"] = {}
        elif spec.get("dash") is not None:
            options.update(engine_args(spec["model"], DashConfig(**spec["dash"])))
        if "dash_fields" in spec:  # hf_overrides' "dash" as given (e.g. a label with max_prompt_tokens)
            options["hf_overrides"]["dash"] = spec["dash_fields"]
        options.update(spec.get("engine", {}))
        llm = LLM(**options)
    except Exception as error:  # the start-up errors are what some tests check
        return {"error": f"{type(error).__name__}: {error}"}
    greedy = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0, ignore_eos=True)
    gated = spec.get("dash") is not None
    result = {"alone": []}
    for ids in spec.get("alone", []):
        if gated:
            llm.apply_model(lambda model: setattr(model.halting, "record", []))
        out = llm.generate([{"prompt_token_ids": ids}], greedy, use_tqdm=False)
        record = llm.apply_model(lambda model: model.halting.record)[0] if gated else []
        result["alone"].append({"tokens": list(out[0].outputs[0].token_ids),
                                "kept": record[0]["kept"] if record else None})
    mixed = spec.get("mixed")
    if mixed:  # long prompts arrive while short requests decode
        engine = llm.llm_engine
        tokens = {}
        for i, ids in enumerate(mixed["short"]):
            engine.add_request(f"short{i}", {"prompt_token_ids": ids}, greedy)
        for _ in range(mixed.get("steps_before", 2)):
            for out in engine.step():
                tokens[out.request_id] = list(out.outputs[0].token_ids)
        for i, ids in enumerate(mixed["long"]):
            engine.add_request(f"long{i}", {"prompt_token_ids": ids}, greedy)
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens[out.request_id] = list(out.outputs[0].token_ids)
        result["mixed"] = {kind: [tokens[f"{kind}{i}"] for i in range(len(mixed[kind]))] for kind in ("short", "long")}
    preempt = spec.get("preempt")
    if preempt:  # more tokens than the KV cache holds: vLLM preempts one (recompute) and resumes it
        engine, params = llm.llm_engine, SamplingParams(max_tokens=preempt["max_tokens"], temperature=0.0, ignore_eos=True)
        scheduler = engine.engine_core.engine_core.scheduler  # the engine runs in this process
        names = [f"p{i}" for i in range(len(preempt["prompts"]))]
        for name, ids in zip(names, preempt["prompts"]):
            engine.add_request(name, {"prompt_token_ids": ids}, params)
        tokens, started, preempted = {}, set(), set()
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens[out.request_id] = list(out.outputs[0].token_ids)
            started |= {request.request_id.split("-")[0] for request in scheduler.running}  # vLLM suffixes ids
            preempted |= {request.request_id.split("-")[0] for request in scheduler.waiting} & started
        alone = [list(llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0].token_ids)
                 for ids in preempt["prompts"]]
        result["preempt"] = {"tokens": [tokens[n] for n in names], "alone": alone,
                             "preempted": [names.index(n) for n in sorted(preempted)]}
    if spec.get("too_long"):
        try:
            llm.generate([{"prompt_token_ids": [5] * (options["max_model_len"] + 10)}], greedy, use_tqdm=False)
            result["too_long"] = "accepted"
        except Exception as error:
            result["too_long"] = f"{type(error).__name__}: {error}"
    del llm
    from vllm.distributed import cleanup_dist_env_and_memory
    cleanup_dist_env_and_memory()
    return result


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    results = {engine["name"]: run_engine(engine) for engine in spec["engines"]}
    json.dump(results, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()

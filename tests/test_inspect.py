"""`inspect`: per-layer update norms, the plot, and the page of halted tokens."""

import io
import re

import pytest
import torch

from conftest import build_model
from dash_prefill import DashConfig, prefill
from dash_prefill import inspect as dash_inspect

# Small ops on a shared CPU run far faster single-threaded.
pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "The grass is green. The sky is blue. The pass key is 12345. Remember it!\n" * 2


class CharTokenizer:
    def __call__(self, text):
        return {"input_ids": [ord(c) % 90 + 3 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i + 29) for i in ids)




@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_norms_at_the_start_layer_are_the_engines_scores(family):
    model = build_model(family)
    ids = torch.tensor(CharTokenizer()(TEXT)["input_ids"])
    absolute, relative = dash_inspect.delta_norms(model, ids)
    assert absolute.shape == relative.shape == (4, len(ids))
    for score, norms in (("absolute", absolute), ("relative", relative)):
        state = prefill(model, ids[None], DashConfig(halt_ratio=0.5, start_layer=2, score=score))
        torch.testing.assert_close(norms[2], state.scores[0].cpu(), rtol=1e-4, atol=1e-5)


def test_inspect_writes_a_plot_and_greys_exactly_the_halted_tokens(tmp_path):
    model = build_model("llama")
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_last=8)
    found = dash_inspect.inspect_prompt(model, CharTokenizer(), TEXT, config, tmp_path)
    assert found.plot_path.read_bytes()[:4] == b"\x89PNG"
    page = found.html_path.read_text(encoding="utf-8")
    greyed = {int(i) for i in re.findall(r'class="tok halted" data-index="(\d+)"', page)}
    shown = {int(i) for i in re.findall(r'class="tok \w+" data-index="(\d+)"', page)}
    state = prefill(model, torch.tensor([CharTokenizer()(TEXT)["input_ids"]]), config)
    expected = set((~state.active_mask[0]).nonzero()[:, 0].tolist())
    assert greyed == expected == set(found.halted) and len(greyed) == len(TEXT) // 2
    assert shown == set(range(len(TEXT)))
    assert "halted token" in page and f"<td>halted tokens</td><td>{len(greyed)}</td>" in page


def test_cli_reads_the_prompt_from_stdin(tmp_path, monkeypatch, capsys):
    from dash_prefill import cli
    monkeypatch.setattr(cli, "_load", lambda name, dtype: (build_model("qwen2"), CharTokenizer()))
    monkeypatch.setattr("sys.stdin", io.StringIO(TEXT))
    assert cli.main(["inspect", "--model", "x", "--prompt-file", "-", "--start-layer", "2",
                     "--protect-last", "4", "--out", str(tmp_path), "--raw"]) == 0
    assert f"{len(TEXT)} tokens, {len(TEXT) // 2} halted after layer 2" in capsys.readouterr().out
    assert (tmp_path / "tokens.html").exists() and (tmp_path / "delta_norms.png").exists()


def test_cli_inspects_the_prompt_that_run_would_prefill(tmp_path, monkeypatch, capsys):
    from dash_prefill import cli
    from dash_prefill.hf.generation import chat_prompt, encode_prompts

    class ChatTokenizer(CharTokenizer):
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return f"<user>{messages[0]['content']}</user><assistant>"

    seen = {}
    monkeypatch.setattr("dash_prefill.demo.compare", lambda model, tok, prompt, *a: seen.setdefault("run", prompt))
    monkeypatch.setattr(cli, "_load", lambda name, dtype: (build_model("qwen2"), ChatTokenizer()))
    monkeypatch.setattr(cli, "_print_comparison", lambda result: None)
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(TEXT)
    cli.main(["run", "--model", "x", "--prompt-file", str(prompt_file)])
    assert cli.main(["inspect", "--model", "x", "--prompt-file", str(prompt_file), "--out", str(tmp_path),
                     "--start-layer", "2"]) == 0
    expected = encode_prompts(ChatTokenizer(), seen["run"], 0)[0].shape[1]
    assert seen["run"] == chat_prompt(ChatTokenizer(), TEXT)
    assert f"\n{expected} tokens," in capsys.readouterr().out and expected > len(TEXT)

"""Evaluation harness: resumability, question protection, fidelity, report and CLI."""

import argparse
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import COMMON
from dash_prefill import prefill
from dash_prefill.core.config import DashConfig
from dash_prefill.eval import cli, runner
from dash_prefill.eval.fidelity import evaluate_fidelity
from dash_prefill.eval.report import summarize, write_report
from dash_prefill.eval.runner import (
    PLAIN, encode_sample, evaluate, parse_policies, read_records, sample_configs)
from dash_prefill.eval.tasks import generate_samples

# Small ops on a shared CPU run far faster single-threaded.
pytestmark = pytest.mark.usefixtures("one_thread")

LENGTH = 700


class CharTokenizer:
    """One token per character (ids 3..92); decode maps ids back to printable characters."""

    pad_token_id, eos_token_id = 0, 2
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 90 + 3 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 29) for i in ids)


class TemplateTokenizer(CharTokenizer):
    chat_template = "user/assistant"
    SUFFIX = "<|end|><|assistant|>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<|user|>" + messages[0]["content"] + self.SUFFIX




@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**COMMON, "max_position_embeddings": 1024})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    # Most tokens end the answer, so greedy decoding stops after a few steps.
    model.generation_config.eos_token_id = list(range(2, 70))
    return model


def count_calls(model):
    """Counter of model calls (prefills and decode steps): a hook on the embedding."""
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_policy_labels_parse_to_configs_with_the_question_unprotected():
    assert parse_policies("plain") == [("plain", PLAIN)]
    (label, config), = parse_policies("dash-rel@0.5/d0.25")
    assert label == "dash-rel@0.5/d0.25" and config.protect_last == 0
    assert (config.policy, config.score, config.halt_ratio, config.start_layer) == ("dash", "relative", 0.5, 0.25)
    assert parse_policies("random@0.5", start_layer=3)[0] == ("random@0.5/s3", parse_policies("random@0.5/s3")[0][1])
    with pytest.raises(ValueError, match="unknown policy 'fastv'"):
        parse_policies("fastv@0.5/s1")
    with pytest.raises(ValueError, match=r"no start layer: add /sLAYER .* or /dFRACTION"):
        parse_policies("dash@0.5")


def test_calibrated_label_is_replaced_by_the_recommended_settings_own_label():
    recommended = DashConfig(halt_ratio=0.75, start_layer=0.3, policy="attention", pool=15)
    labels = [label for label, _ in parse_policies("plain,calibrated", calibrated=recommended)]
    assert labels == ["plain", "attention@0.75/d0.3/p15"] == ["plain", recommended.label]
    with pytest.raises(ValueError, match="calibrated"):
        parse_policies("calibrated")


def test_a_result_written_under_a_label_is_found_again_under_the_same_label(model, tmp_path):
    """A results file whose labels are in this grammar (as the committed ones are since issue 28)
    resumes: the cell of ``dash@0.5/d0.4`` is found whether it is asked for with its start or,
    with start_layer 0.4, without."""
    path = tmp_path / "results.jsonl"
    evaluate(model, CharTokenizer(), "tiny", ["passkey"], LENGTH, 1, parse_policies("dash@0.5/d0.4"), path)
    calls, handle = count_calls(model)
    again = evaluate(model, CharTokenizer(), "tiny", ["passkey"], LENGTH, 1, parse_policies("dash@0.5", 0.4), path)
    handle.remove()
    assert calls == [] and [r["label"] for r in again] == ["dash@0.5/d0.4"]


def test_rerun_makes_no_model_calls_and_a_new_policy_runs_only_its_cells(model, tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    policies = parse_policies("plain,dash@0.5/d0.4")
    first = evaluate(model, CharTokenizer(), "tiny", ["passkey"], LENGTH, 2, policies, path)
    assert len(first) == 4 and len(read_records(path)) == 4

    calls, handle = count_calls(model)
    again = evaluate(model, CharTokenizer(), "tiny", ["passkey"], LENGTH, 2, policies, path)
    assert calls == [] and again == first and len(read_records(path)) == 4

    branches = []
    original = runner.prefill_branches
    monkeypatch.setattr(runner, "prefill_branches",
                        lambda m, ids, configs: branches.append(len(configs)) or original(m, ids, configs))
    evaluate(model, CharTokenizer(), "tiny", ["passkey"], LENGTH, 2, policies + parse_policies("random@0.5/d0.4"), path)
    handle.remove()
    added = read_records(path)[4:]
    assert branches == [1, 1] and len(calls) > 0
    assert [(r["label"], r["sample"]) for r in added] == [("random@0.5/d0.4", 0), ("random@0.5/d0.4", 1)]


@pytest.mark.parametrize("tokenizer", [CharTokenizer(), TemplateTokenizer()], ids=["raw", "chat"])
def test_protect_last_covers_question_and_answer_prefix(model, tokenizer):
    sample = generate_samples("passkey", runner.token_counter(tokenizer), LENGTH, 1)[0]
    prompt = encode_sample(tokenizer, sample)
    suffix = TemplateTokenizer.SUFFIX if prompt.chat_template else ""
    assert prompt.tail_tokens == len(sample.question + suffix + sample.answer_prefix)
    config = sample_configs(parse_policies("dash@0.9/s1"), sample, prompt)[0]
    state = prefill(model, torch.tensor([prompt.ids]), config)
    active = set(state.active_mask[0].nonzero()[:, 0].tolist())
    tail = range(len(prompt.ids) - prompt.tail_tokens, len(prompt.ids))
    assert set(tail) <= active
    assert len(active) < len(prompt.ids)  # the context was halted


def test_zero_halt_ratio_scores_and_predictions_equal_plain(model, tmp_path):
    policies = parse_policies("plain,dash@0.0/d0.4,random@0.0/d0.4")
    records = evaluate(model, CharTokenizer(), "tiny", ["passkey"], LENGTH, 2, policies, tmp_path / "r.jsonl")
    by_label = {}
    for record in records:
        by_label.setdefault(record["label"], []).append((record["prediction"], record["score"]))
    assert by_label["dash@0.0/d0.4"] == by_label["plain"] == by_label["random@0.0/d0.4"]


def test_fidelity_of_plain_against_itself_is_exact(model, tmp_path):
    policies = [("plain", PLAIN)] + parse_policies("dash@0.5/d0.4")
    records = evaluate_fidelity(model, CharTokenizer(), "tiny", ["passkey", "niah_single_1"], LENGTH, 3,
                                policies, tmp_path / "r.jsonl", num_tokens=4)
    plain = [r for r in records if r["label"] == "plain"]
    assert len(plain) == 3 and {r["task"] for r in plain} == {"passkey", "niah_single_1"}
    assert all(r["kl"] < 1e-9 and r["top1_agree"] and r["exact_match"] for r in plain)
    assert all(r["kl"] >= 0 for r in records)
    calls, handle = count_calls(model)
    evaluate_fidelity(model, CharTokenizer(), "tiny", ["passkey", "niah_single_1"], LENGTH, 3,
                      policies, tmp_path / "r.jsonl", num_tokens=4)
    handle.remove()
    assert calls == []


def synthetic_records():
    records = []
    for label, ratio, policy, scores in (("plain", 0.0, "none", (100, 60)), ("dash@0.5", 0.5, "dash", (100, 20)),
                                         ("random@0.5", 0.5, "random", (0, 20))):
        config = {"halt_ratio": ratio, "start_layer": 0.4, "protect_first": 4, "protect_last": 0,
                  "policy": policy, "score": "absolute", "seed": 0}
        for task, value in zip(("passkey", "vt"), scores):
            records.append({"kind": "task", "model": "m", "length": 4096, "task": task, "sample": 0,
                            "label": label, "config": config, "seed": 42, "score": value,
                            "prompt_tokens": 100, "kept_tokens": int(100 * (1 - ratio)),
                            "ideal_speedup": 1 + ratio})
        if policy != "none":
            records.append({"kind": "fidelity", "model": "m", "length": 4096, "task": "vt", "sample": 0,
                            "label": label, "config": config, "seed": 42, "kl": 0.5, "top1_agree": True,
                            "exact_match": False, "matched_prefix": 3, "key_extra": {"num_tokens": 16}})
    return records


def test_report_builds_markdown_and_plots_from_a_results_file(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records()) + '{"torn": ')
    report = write_report(path, tmp_path / "out")
    text = report.read_text()
    assert "| policy | passkey | vt | mean | vs plain %" in text
    assert "| dash@0.5 | 100.0 | 20.0 | **60.0** | 75.0 |" in text
    assert "Fidelity against plain prefill" in text and "| m | 4096 | dash@0.5 | 1 | 0.5000 | 100.0 | 0.0 |" in text
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert all(f"({p.name})" in text for p in pngs)
    rows = {r["label"]: r for r in summarize(read_records(path))}
    assert rows["plain"]["vs_plain"] == 100.0 and rows["random@0.5"]["kept"] == 0.5


def test_cli_preset_overrides_and_report_only(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--preset", "full-smollm2", "--samples", "2", "--out", str(tmp_path)])
    runs = cli.plan(args)
    assert [r.samples for r in runs] == [2, 2] and len(runs[0].tasks) == 14
    with pytest.raises(ValueError, match="--model"):
        cli.plan(parser.parse_args(["--tasks", "vt"]))
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_records()))
    assert cli.main(parser.parse_args(["--report-only", "--out", str(tmp_path)])) == 0
    assert "dash@0.5" in capsys.readouterr().out and (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_quick_preset_runs_for_real(tmp_path):
    """The `quick` preset end to end on smollm2-135m (~16 min on 2 quiet cores, ~25 on a busy CPU)."""
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.main(parser.parse_args(["--preset", "quick", "--out", str(tmp_path)])) == 0
    records = read_records(tmp_path / "results.jsonl")
    assert len(records) == 3 * 10 * 3
    assert {r["label"] for r in records} == {"plain", "dash@0.5/d0.8", "random@0.5/d0.8"}
    assert all(r["prompt_tokens"] <= 4096 for r in records)

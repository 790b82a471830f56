"""Every entry point runs the model's recommended setting unless the user gives one, and says
which setting it ran and where it came from (a user profile, a shipped one, the registry)."""

import argparse
import dataclasses
import json
import logging

import pytest
import torch

from conftest import build_model, random_ids
import dash_prefill
from dash_prefill import DashConfig, cli, demo, generate, prefill, recommended_config
from dash_prefill.core import profiles
from dash_prefill.core.profiles import Recommendation, recommendation
from dash_prefill.loading import REGISTRY
from test_errors import _Tokenizer as CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
# A registry model's spec on the tiny llama (4 layers, context 256): start layer 0.8 -> layer 3.
SPEC = dataclasses.replace(REGISTRY["smollm2-135m"], max_context=256)
PROFILED = DashConfig(halt_ratio=0.75, start_layer=1)


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Empty user and shipped profile directories: (user, shipped)."""
    monkeypatch.setenv("DASH_PREFILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(profiles, "_SHIPPED", tmp_path / "shipped")
    return tmp_path / "cache" / "profiles", tmp_path / "shipped"


def write_profile(directory, name: str, **setting):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"setting": setting, "command": "dash-prefill calibrate (test)"}))
    return path


def registry_model():
    model = build_model("llama")
    model.dash_prefill_spec = SPEC
    return model


def test_the_recommendation_is_the_user_profile_else_the_shipped_one_else_the_registry_start(dirs):
    user, shipped = dirs
    model = registry_model()
    found = recommendation(model)
    assert found.config == DashConfig(start_layer=0.8) and "registry start layer of smollm2-135m" in found.source
    shipped_path = write_profile(shipped, "smollm2-135m", policy="attention", halt_ratio=0.75, start_layer=0.6, pool=15)
    assert recommendation(model) == Recommendation(DashConfig(policy="attention", halt_ratio=0.75, start_layer=0.6,
                                                              pool=15), f"calibration profile {shipped_path}")
    user_path = write_profile(user, "smollm2-135m", halt_ratio=0.25, start_layer=2)
    assert recommendation(model) == Recommendation(DashConfig(halt_ratio=0.25, start_layer=2),
                                                   f"calibration profile {user_path}")
    assert recommendation(build_model("llama")) == Recommendation(
        DashConfig(), "the paper's setting, no calibration profile: run dash-prefill calibrate")


def test_recommended_config_is_the_one_public_way_and_logs_its_label_and_source(dirs, caplog):
    assert not hasattr(dash_prefill, "recommended_setting") and "recommended_setting" not in dash_prefill.__all__
    with caplog.at_level(logging.INFO, logger="dash_prefill"):
        config = recommended_config(registry_model())
    assert config == DashConfig(start_layer=0.8)
    assert ("recommended setting of smollm2-135m: dash@0.5/d0.8 (registry start layer of smollm2-135m, "
            "no calibration profile)") in caplog.text
    assert str(recommendation(registry_model())) == "dash@0.5/d0.8 (registry start layer of smollm2-135m, no calibration profile)"


def test_a_profile_of_another_policy_leaves_that_policy_the_registry_start_layer(dirs):
    path = write_profile(dirs[1], "smollm2-135m", policy="contribution", halt_ratio=0.5, start_layer=0.25, pool=63)
    found = recommendation(registry_model(), "dash")
    config, source = found.config, found.source
    assert config == DashConfig(policy="dash", start_layer=0.8)
    assert source == f"registry start layer of smollm2-135m, the calibration profile {path} is for policy contribution"


def test_a_broken_profile_is_one_error_naming_the_file(dirs):
    path = write_profile(dirs[0], "smollm2-135m", halt_ratio=2.0)
    with pytest.raises(ValueError, match=rf"{path} is not a valid calibration profile \(halt_ratio must be"):
        recommended_config(registry_model())


def test_prefill_and_generate_without_a_config_run_the_recommended_setting_and_log_it(dirs, caplog):
    model, ids = registry_model(), random_ids(1, 120)
    registry = prefill(model, ids)
    assert registry.stats.start_layer == 3  # the registry's 0.8 of 4 layers
    path = write_profile(dirs[0], "smollm2-135m", **dataclasses.asdict(PROFILED))
    with caplog.at_level(logging.INFO, logger="dash_prefill"):
        result = prefill(model, ids)
    assert f"dash@0.75/s1 (calibration profile {path})" in caplog.text
    assert torch.equal(result.logits, prefill(model, ids, PROFILED).logits)
    assert not torch.equal(result.logits, registry.logits) and result.stats.start_layer == 1
    out = generate(model, CharTokenizer(), "x" * 120, max_new_tokens=2)
    assert out.config == PROFILED and out.stats.start_layer == 1


def write_bounded(directory, name: str, max_prompt_tokens: int, config: DashConfig):
    path = write_profile(directory, name, **dataclasses.asdict(config))
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_prompt_tokens": max_prompt_tokens}))
    return path


PLAIN = DashConfig.from_label("plain")


def test_a_profile_holds_up_to_the_prompt_length_it_was_measured_at_and_longer_prompts_get_plain(dirs, caplog):
    path = write_bounded(dirs[0], "smollm2-135m", 100, PROFILED)
    model = registry_model()
    assert recommendation(model, prompt_tokens=100) == Recommendation(PROFILED, f"calibration profile {path}", 100)
    with caplog.at_level(logging.WARNING, logger="dash_prefill"):
        longer = recommendation(model, prompt_tokens=101)
    assert longer.config == PLAIN and longer.max_prompt_tokens == 100 and str(path) in longer.source
    assert f"holds for prompts up to 100 tokens; this one has 101: plain prefill" in caplog.text
    assert "dash-prefill calibrate --model smollm2-135m --length 101" in caplog.text
    assert recommendation(model).config == PROFILED  # no length given (an engine's start): the profile, bound kept
    assert recommendation(model).max_prompt_tokens == 100


def test_prefill_generate_and_halting_apply_the_profiles_bound_to_each_prompt(dirs):
    write_bounded(dirs[0], "smollm2-135m", 100, PROFILED)
    model, short, long = registry_model(), random_ids(1, 100), random_ids(1, 120)
    assert torch.equal(prefill(model, short).logits, prefill(model, short, PROFILED).logits)
    plain = prefill(model, long, PLAIN)
    assert not torch.equal(plain.logits, prefill(model, long, PROFILED).logits)  # the bound is visible
    assert torch.equal(prefill(model, long).logits, plain.logits)
    assert generate(model, CharTokenizer(), "x" * 120, max_new_tokens=2).config == PLAIN
    assert generate(model, CharTokenizer(), "x" * 90, max_new_tokens=2).config == PROFILED
    options = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with dash_prefill.halting(model):  # resolved at each prefill, from that prompt's length
        recommended = [model.generate(ids, **options) for ids in (short, long)]
    for ids, got, expected in zip((short, long), recommended, (PROFILED, PLAIN)):
        with dash_prefill.halting(model, expected):
            assert torch.equal(got, model.generate(ids, **options))


def test_a_left_padded_batch_is_measured_by_its_longest_row_not_its_width(dirs):
    write_bounded(dirs[0], "smollm2-135m", 100, PROFILED)
    model, ids = registry_model(), random_ids(2, 110)
    mask = torch.ones(2, 110, dtype=torch.long)
    mask[:, :10], mask[1, :30] = 0, 0  # rows of 100 and 80 tokens in a 110-wide batch
    assert torch.equal(prefill(model, ids, attention_mask=mask).logits, prefill(model, ids, PROFILED, mask).logits)
    tokens = generate(model, CharTokenizer(), ids, attention_mask=mask, max_new_tokens=2)
    assert tokens.config == PROFILED


def test_a_command_on_a_prompt_longer_than_the_profiles_bound_runs_plain_and_says_why(dirs, captured, capsys):
    path = write_bounded(dirs[0], "smollm2-135m", 99, PROFILED)
    assert cli.main(["demo", "--tokens", "100", "--max-new-tokens", "4"]) == 2
    assert captured["config"] == PLAIN
    assert f"plain prefill: 100 tokens is longer than the 99 the calibration profile {path}" in capsys.readouterr().out
    assert cli.main(["demo", "--tokens", "100", "--max-new-tokens", "4", "--halt-ratio", "0.5"]) == 2
    assert captured["config"] == dataclasses.replace(PROFILED, halt_ratio=0.5)  # options given: the profile's rest


@pytest.fixture
def captured(monkeypatch):
    """demo/run/inspect on the tiny registry model: the config they would run, then they stop."""
    seen = {}

    def stop(model, tokenizer, prompt, config, *rest, **options):
        seen["config"] = config
        raise ValueError("stopped by the test")

    monkeypatch.setattr(cli, "_load", lambda name, dtype: (registry_model(), CharTokenizer()))
    monkeypatch.setattr(demo, "needle_prompt", lambda tokenizer, tokens: demo.NeedlePrompt("x" * 100, "1"))
    monkeypatch.setattr(demo, "compare", stop)
    monkeypatch.setattr("dash_prefill.inspect.inspect_prompt", stop)
    return seen


def _argv(command: str, tmp_path) -> list[str]:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The pass key is 12345. What is the pass key?")
    if command == "demo":
        return ["demo", "--tokens", "100", "--max-new-tokens", "4"]
    return [command, "--model", "x", "--prompt-file", str(prompt)]


@pytest.mark.parametrize("command", ["demo", "run", "inspect"])
def test_commands_run_the_recommended_setting_and_print_it_with_its_source(command, dirs, captured, capsys,
                                                                            tmp_path):
    assert cli.main(_argv(command, tmp_path)) == 2
    assert captured["config"] == DashConfig(start_layer=0.8)
    assert "DASH setting: dash@0.5/d0.8 (registry start layer of smollm2-135m" in capsys.readouterr().out
    path = write_profile(dirs[0], "smollm2-135m", **dataclasses.asdict(PROFILED))
    assert cli.main(_argv(command, tmp_path)) == 2
    assert captured["config"] == PROFILED
    assert f"DASH setting: dash@0.75/s1 (calibration profile {path})" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["demo", "run", "inspect"])
def test_options_given_override_the_recommendation_and_are_named(command, dirs, captured, capsys, tmp_path):
    path = write_profile(dirs[1], "smollm2-135m", **dataclasses.asdict(PROFILED))
    assert cli.main([*_argv(command, tmp_path), "--halt-ratio", "0.25", "--protect-last", "8"]) == 2
    assert captured["config"] == dataclasses.replace(PROFILED, halt_ratio=0.25, protect_last=8)
    assert (f"DASH setting: dash@0.25/s1 (--halt-ratio as given, the rest from the calibration profile {path})"
            in capsys.readouterr().out)


def test_inspect_with_another_policy_than_the_profiles_starts_at_the_registry_layer(dirs, captured, capsys,
                                                                                   tmp_path):
    write_profile(dirs[0], "smollm2-135m", **dataclasses.asdict(PROFILED))
    assert cli.main([*_argv("inspect", tmp_path), "--policy", "random"]) == 2
    assert captured["config"] == DashConfig(policy="random", start_layer=0.8)
    assert "is for policy dash" in capsys.readouterr().out


def test_a_bad_halt_ratio_is_refused_before_the_model_loads(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--halt-ratio", "1.2"])
    assert exit_.value.code == 2
    assert "halt ratio must be a number in [0, 1); got '1.2'" in capsys.readouterr().err


def _eval_labels(argv, monkeypatch, tmp_path) -> list[tuple[str, DashConfig]]:
    """The (label, config) pairs ``dash-prefill eval ARGV`` would evaluate on the tiny registry model."""
    from dash_prefill import loading
    from dash_prefill.eval import cli as eval_cli

    seen = []
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (registry_model(), CharTokenizer()))
    monkeypatch.setattr(eval_cli, "evaluate", lambda model, tok, name, tasks, length, samples, policies, *a, **k:
                        seen.extend(policies))
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args(["--model", "smollm2-135m", "--tasks", "vt", "--length", "200", "--samples", "1",
                              "--out", str(tmp_path), *argv])
    eval_cli._run_all(eval_cli.plan(args), args, tmp_path / "results.jsonl")
    return seen


def test_eval_labels_without_a_start_layer_run_at_the_recommended_one_and_name_it(dirs, monkeypatch, tmp_path,
                                                                                   capsys):
    policies = _eval_labels(["--policies", "plain,dash@0.5,random@0.5,dash@0.5/s2"], monkeypatch, tmp_path)
    assert [label for label, _ in policies] == ["plain", "dash@0.5/d0.8", "random@0.5/d0.8", "dash@0.5/s2"]
    assert [config.start_layer for _, config in policies[1:]] == [0.8, 0.8, 2]
    assert ("smollm2-135m: labels without a start layer run at d0.8 (registry start layer of smollm2-135m"
            in capsys.readouterr().out)
    path = write_profile(dirs[0], "smollm2-135m", **dataclasses.asdict(PROFILED))
    policies = _eval_labels(["--policies", "dash@0.5,calibrated"], monkeypatch, tmp_path)
    assert [label for label, _ in policies] == ["dash@0.5/s1", "dash@0.75/s1"]
    assert f"calibrated = dash@0.75/s1 (calibration profile {path})" in capsys.readouterr().out


def test_eval_labels_keep_the_start_layer_the_user_gives(dirs, monkeypatch, tmp_path):
    policies = _eval_labels(["--policies", "plain,dash@0.5", "--start-layer", "d0.4"], monkeypatch, tmp_path)
    assert [label for label, _ in policies] == ["plain", "dash@0.5/d0.4"] and policies[1][1].start_layer == 0.4

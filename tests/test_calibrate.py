"""Calibration: fidelity measurement against plain prefill, the choice within a budget, profiles."""

import json
from types import SimpleNamespace

import pytest

from conftest import build_model, random_ids
from dash_prefill import DashConfig
from dash_prefill.calibrate import (Budget, BudgetNotMetError, CalibrationPrompt, choose, front,
                                    measure, read_prompts, settings_grid, write_profile)
from dash_prefill.core.profiles import recommendation, recommended_config, user_profile_path


def _row(label, speedup, kl, agreement=1.0):
    return {"label": label, "config": {}, "kl": kl, "top1_agreement": agreement,
            "nll_change": None, "ideal_speedup": speedup}


def test_the_fastest_setting_within_the_budget_is_chosen():
    rows = [_row("slow", 1.1, 0.001), _row("fast-but-wrong", 2.0, 0.5), _row("fast", 1.6, 0.04),
            _row("fast-disagreeing", 1.8, 0.01, agreement=0.5)]
    assert choose(rows, Budget(max_kl=0.05, min_agreement=0.9))["label"] == "fast"
    assert choose(rows, Budget(max_kl=0.01, min_agreement=0.9))["label"] == "slow"


def test_a_budget_no_setting_meets_names_the_closest_setting():
    rows = [_row("a", 1.5, 0.3), _row("b", 1.2, 0.08)]
    with pytest.raises(BudgetNotMetError, match="closest: b"):
        choose(rows, Budget(max_kl=0.01))


def test_front_keeps_only_settings_no_other_beats_on_speed_and_kl():
    rows = [_row("a", 2.0, 0.5), _row("b", 1.5, 0.6), _row("c", 1.2, 0.01), _row("d", 1.5, 0.1)]
    assert [r["label"] for r in front(rows)] == ["a", "d", "c"]


def test_grid_is_every_policy_start_and_ratio_and_rejects_unknown_policies():
    grid = settings_grid(["dash", "attention/p15"], (0.2, 0.4), (0.5, 0.75))
    assert len(grid) == 8
    label, config = grid[-1]
    assert label == "attention@0.75/d0.4/p15"
    assert (config.policy, config.pool, config.start_layer, config.halt_ratio) == ("attention", 15, 0.4, 0.75)
    with pytest.raises(ValueError, match="unknown policy 'fastv'"):
        settings_grid(["fastv"], (0.4,), (0.5,))


def test_calibrate_starts_take_layer_indices_as_the_labels_write_them():
    from dash_prefill.calibrate_cli import _starts

    starts = _starts("d0.6,11")
    assert starts == (0.6, 11) and isinstance(starts[1], int)
    label, config = settings_grid(["attention/p63"], starts[1:], (0.75,))[0]
    assert label == "attention@0.75/s11/p63" and config.start_layer == 11


def test_zero_ratio_is_perfectly_faithful_and_heavy_halting_is_not():
    model = build_model("llama")
    prompts = [CalibrationPrompt(random_ids(1, 40, seed=s)[0].tolist(), random_ids(1, 6, seed=9)[0].tolist(),
                                 4, "test") for s in range(2)]
    grid = [("none", DashConfig(halt_ratio=0.0, start_layer=1)),
            ("heavy", DashConfig(halt_ratio=0.9, start_layer=1, protect_first=0))]
    exact, heavy = measure(model, prompts, grid)
    assert exact["kl"] < 1e-6 and exact["top1_agreement"] == 1.0 and abs(exact["nll_change"]) < 1e-6
    assert heavy["kl"] > 1e-3 and heavy["ideal_speedup"] > 1.0


def test_user_profile_overrides_the_default_and_says_where_it_came_from(tmp_path, monkeypatch):
    monkeypatch.setenv("DASH_PREFILL_CACHE", str(tmp_path))
    model = build_model("qwen3")
    config, source = recommendation(model).config, recommendation(model).source
    assert config == DashConfig() and "paper" in source
    chosen = {"label": "attention@0.75/d0.3/p15", "kl": 0.01, "top1_agreement": 0.97,
              "nll_change": 0.0, "ideal_speedup": 1.9,
              "config": {"policy": "attention", "halt_ratio": 0.75, "start_layer": 0.3, "pool": 15,
                         "score": "absolute", "protect_first": 4}}
    path = write_profile(user_profile_path(model), "tiny", chosen, [chosen], Budget(), {})
    assert path.parent == tmp_path / "profiles"
    config, source = recommendation(model).config, recommendation(model).source
    assert config == DashConfig(halt_ratio=0.75, start_layer=0.3, policy="attention", pool=15)
    assert str(path) in source
    assert recommended_config(model) == config
    assert json.loads(path.read_text())["label"] == "attention@0.75/d0.3/p15"


def test_user_prompts_file_needs_a_context_on_every_line(tmp_path):
    class Words:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [len(w) for w in text.split()]}

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"context": "a bb ccc", "question": " dd", "continuation": "e ff"}) + "\n")
    (prompt,) = read_prompts(good, Words())
    assert prompt.ids == [1, 2, 3, 2] and prompt.protect_last == 1 and prompt.continuation == [1, 2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: each line must be a JSON object with a \"context\""):
        read_prompts(bad, Words())
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_prompts(tmp_path / "missing.jsonl", Words())


def test_without_a_held_out_continuation_the_reference_is_plains_greedy_continuation():
    model = build_model("llama")
    ids = random_ids(1, 40, seed=2)[0].tolist()
    grid = [("exact", DashConfig(halt_ratio=0.0, start_layer=1))]
    (row,) = measure(model, [CalibrationPrompt(ids, [], 4, "test")], grid, num_tokens=5)
    assert row["kl"] < 1e-6 and row["top1_agreement"] == 1.0 and row["nll_change"] is None


def _rows_file(tmp_path):
    rows = [{"label": "dash@0.5/d0.4", "config": {"policy": "dash", "halt_ratio": 0.5, "start_layer": 0.4,
                                                 "pool": 1, "score": "absolute", "protect_first": 4},
             "kl": 0.03, "top1_agreement": 0.97, "nll_change": 0.01, "ideal_speedup": 1.46},
            {"label": "dash@0.75/d0.4", "config": {"policy": "dash", "halt_ratio": 0.75, "start_layer": 0.4,
                                                  "pool": 1, "score": "absolute", "protect_first": 4},
             "kl": 0.2, "top1_agreement": 0.8, "nll_change": 0.1, "ideal_speedup": 1.86}]
    path = tmp_path / "m.rows.json"
    path.write_text(json.dumps(rows))
    return path


def test_calibrate_rows_chooses_again_under_a_new_budget_without_the_model(tmp_path, capsys):
    from dash_prefill.cli import main

    rows, out = _rows_file(tmp_path), tmp_path / "profile.json"
    assert main(["calibrate", "--model", "not-a-model", "--rows", str(rows), "--budget", "0.05",
                 "--min-agreement", "0.9", "--out", str(out)]) == 0
    profile = json.loads(out.read_text())
    assert profile["label"] == "dash@0.5/d0.4" and profile["budget"] == {"max_kl": 0.05, "min_agreement": 0.9}
    assert main(["calibrate", "--model", "not-a-model", "--rows", str(rows), "--budget", "0.5",
                 "--min-agreement", "0.5", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["label"] == "dash@0.75/d0.4"


def test_calibrate_rows_under_an_unmet_budget_names_the_closest_and_exits_2(tmp_path, capsys):
    from dash_prefill.cli import main

    assert main(["calibrate", "--model", "m", "--rows", str(_rows_file(tmp_path)), "--budget", "0.01",
                 "--out", str(tmp_path / "p.json")]) == 2
    assert "closest: dash@0.5/d0.4" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_calibrate_rows_of_a_missing_file_is_one_line_and_exit_2(tmp_path, capsys):
    from dash_prefill.cli import main

    assert main(["calibrate", "--model", "m", "--rows", str(tmp_path / "none.rows.json")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_calibration_settings_take_labels_with_later_gates_and_shifted_spans():
    (label, config), = settings_grid([], (), (), ["attention@0.3/s1/p7o2+0.75/s2"])
    assert label == "attention@0.3/s1/p7o2+0.75/s2"
    assert (config.start_layer, config.halt_ratio, config.pool, config.pool_offset, config.later_gates) == \
        (1, 0.3, 7, 2, ((2, 0.75),))
    assert config.protect_last == DashConfig().protect_last
    assert len(settings_grid(["dash"], (0.4,), (0.5,), [label])) == 2
    with pytest.raises(ValueError, match="halts nothing"):
        settings_grid([], (), (), ["plain"])
    with pytest.raises(ValueError, match="grid is empty"):
        settings_grid([], (0.4,), (0.5,))


def test_a_later_gate_is_measured_faster_than_its_first_gate_alone():
    model = build_model("llama")
    prompts = [CalibrationPrompt(random_ids(1, 48, seed=3)[0].tolist(), random_ids(1, 6, seed=9)[0].tolist(),
                                 4, "test")]
    one, two = measure(model, prompts, settings_grid([], (), (), ["attention@0.25/s1", "attention@0.25/s1+0.75/s2"]))
    assert two["ideal_speedup"] > one["ideal_speedup"] > 1.0
    assert two["kl"] != one["kl"]


def test_a_profile_with_later_gates_and_an_offset_gives_that_config_back(tmp_path, monkeypatch):
    from dash_prefill.calibrate import _setting

    monkeypatch.setenv("DASH_PREFILL_CACHE", str(tmp_path))
    model = build_model("qwen3")
    (label, config), = settings_grid([], (), (), ["attention@0.3/s1/p7o2+0.75/s2"])
    chosen = {"label": label, "kl": 0.01, "top1_agreement": 0.97, "nll_change": 0.0, "ideal_speedup": 1.8,
              "config": _setting(config)}
    write_profile(user_profile_path(model), "tiny", chosen, [chosen], Budget(), {})
    assert recommended_config(model) == config


def test_calibrate_settings_with_an_unreadable_label_is_one_line_and_exit_2(capsys):
    from dash_prefill.cli import main

    assert main(["calibrate", "--model", "m", "--settings", "attention@0.3+0.75", "--policies", ""]) == 2
    err = capsys.readouterr().err
    assert "cannot read label 'attention@0.3+0.75'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_grid_policy_takes_a_shifted_span_and_refuses_a_malformed_one():
    (label, config), = settings_grid(["attention/p47o16"], (0.5,), (0.9,))
    assert label == "attention@0.9/d0.5/p47o16" and (config.pool, config.pool_offset) == (47, 16)
    for bad in ("attention/p47o", "attention/o16", "attention/p47x16"):
        with pytest.raises(ValueError, match=f"policy '{bad}' \\(write NAME\\[-rel\\]\\[/pPOOL\\[oOFFSET\\]\\]"):
            settings_grid([bad], (0.5,), (0.9,))


def test_calibration_chooses_the_density_too_and_a_sparse_profile_gives_that_config_back(tmp_path, monkeypatch):
    from dash_prefill.calibrate import _setting

    grid = settings_grid(["dash"], (1,), (0.5,), densities=(1.0, 0.2))
    assert [label for label, _ in grid] == ["dash@0.5/s1", "dash@0.5/s1~0.2"]
    model = build_model("llama")
    model.config.max_position_embeddings = 4096
    prompts = [CalibrationPrompt(random_ids(1, 1800, seed=3)[0].tolist(), random_ids(1, 4, seed=9)[0].tolist(),
                                 4, "test")]
    dense, sparse = measure(model, prompts, grid)
    assert sparse["ideal_speedup"] > dense["ideal_speedup"]
    assert sparse["kl"] != dense["kl"]
    monkeypatch.setenv("DASH_PREFILL_CACHE", str(tmp_path))
    chosen = {**sparse, "config": _setting(grid[1][1])}
    write_profile(user_profile_path(model), "tiny", chosen, [chosen], Budget(), {})
    assert recommended_config(model).density == 0.2


def test_calibrate_densities_out_of_range_is_one_line_and_exit_2(capsys):
    from dash_prefill.cli import main

    assert main(["calibrate", "--model", "m", "--densities", "0", "--policies", "dash"]) == 2
    err = capsys.readouterr().err
    assert "density must be" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_profile_records_the_prompt_length_it_was_measured_at_and_choosing_again_keeps_it(tmp_path, monkeypatch):
    from dash_prefill import calibrate_cli, loading
    from dash_prefill.cli import main

    rows = json.loads(_rows_file(tmp_path).read_text())
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (build_model("llama"), None))
    monkeypatch.setattr(calibrate_cli, "builtin_prompts", lambda tokenizer, length, count: [
        SimpleNamespace(ids=[1] * (length - 10))] * count)
    monkeypatch.setattr(calibrate_cli, "measure", lambda model, prompts, grid: rows)
    out = tmp_path / "measured.json"
    assert main(["calibrate", "--model", "m", "--length", "3000", "--count", "2", "--policies", "dash", "--budget", "0.5",
                 "--starts", "d0.4", "--ratios", "0.5", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["max_prompt_tokens"] == 3000
    again = tmp_path / "again.json"
    rows_file = out.with_suffix(".rows.json")
    assert main(["calibrate", "--model", "m", "--rows", str(rows_file), "--budget", "0.5", "--out", str(again)]) == 0
    assert json.loads(again.read_text())["max_prompt_tokens"] == 3000

"""One label grammar, DashConfig's: every tool reads and writes settings through
DashConfig.from_label / DashConfig.label, and the committed results are keyed by it."""

import argparse
import dataclasses
import itertools
import json
import re
from pathlib import Path

import pytest

from dash_prefill import DashConfig
from dash_prefill.core.policy import POLICIES

ROOT = Path(__file__).resolve().parent.parent


def _configs():
    """Every combination of what a label names that DashConfig accepts."""
    gates = ((), ((14, 0.95),), ((0.6, 0.9), (20, 0.95)))
    pools = ((1, 0), (15, 0), (47, 16), (63, -28))
    densities = ((1.0, 1.0), (0.1, 1.0), (0.05, 0.2), (1.0, 0.1 + 0.2))  # before, after the first gate
    for policy, score, ratio, start, (pool, offset), later, (density, after) in itertools.product(
            POLICIES, ("absolute", "relative"), (0.0, 0.25, 0.5, 0.1 + 0.2, 1e-05),
            (0, 8, 0.4, 0.25, 0.1 + 0.2), pools, gates, densities):
        try:
            yield DashConfig(policy=policy, score=score, halt_ratio=ratio, start_layer=start, pool=pool,
                             pool_offset=offset, later_gates=later, density=density, later_density=after)
        except ValueError:
            continue


def test_every_config_a_label_can_express_reads_back_from_its_label():
    configs = list(_configs()) + [DashConfig(halt_ratio=0.0, policy="none"),
                                  DashConfig(halt_ratio=0.0, policy="none", density=0.1)]
    assert len(configs) > 4000
    for config in configs:
        assert DashConfig.from_label(config.label) == config, config.label
    assert DashConfig(halt_ratio=0, start_layer=3).label == DashConfig(halt_ratio=0.0, start_layer=3).label


def test_a_layer_index_and_a_fraction_of_depth_are_told_apart_by_their_letter_not_a_dot():
    index, fraction = DashConfig.from_label("dash@0.5/s8"), DashConfig.from_label("dash@0.5/d0.8")
    assert index.start_layer == 8 and isinstance(index.start_layer, int) and fraction.start_layer == 0.8
    assert (index.label, fraction.label) == ("dash@0.5/s8", "dash@0.5/d0.8")
    for label, message in (("dash@0.5/s0.8", "write d0.8 for 0.8 of depth"),
                           ("dash@0.5/d8", "write s8 for layer index 8"),
                           ("dash@0.5/s1.0", "write s1 for layer index 1"),
                           ("dash@0.5/d1.0", "write s1 for layer index 1"),
                           ("dash@0.5/s8+0.9/s0.6", "write d0.6 for 0.6 of depth")):
        with pytest.raises(ValueError, match=re.escape(message)):
            DashConfig.from_label(label)


def test_a_float_start_layer_equal_to_an_integer_is_refused_naming_the_int():
    for config in ({"start_layer": 1.0}, {"start_layer": 2, "later_gates": ((4.0, 0.9),)}):
        with pytest.raises(ValueError, match=r"is a float, which means a fraction of depth in \(0, 1\); "
                                             r"for layer \d pass the int \d"):
            DashConfig(**config)


@pytest.mark.parametrize("label", ["dash@0.5", "attention@0.75/p63", "attention@0.75/p63+0.9/s17"])
def test_a_label_without_a_start_layer_is_an_error_saying_what_to_add(label):
    with pytest.raises(ValueError, match=r"no start layer: add /sLAYER \(a layer index, /s8\) or /dFRACTION"):
        DashConfig.from_label(label)
    assert DashConfig.from_label(label, start_layer=3).start_layer == 3  # a start given by the caller


@pytest.mark.parametrize("label, message", [
    ("fastv@0.5/s1", "unknown policy 'fastv'; use one of dash, "),
    ("none@0.5/s1", "or plain for plain prefill"),
    ("dash@1.2/s1", r"halt_ratio must be in [0, 1); got 1.2"),
    ("dash@0.5.1/s1", "'0.5.1' is not a number"),
    ("dash@0.5/s1/p4", "pool must be an odd int"),
    ("dash@0.5/s1/p5o9", "|pool_offset| <= pool // 2 = 2"),
    ("dash@0.5/p5/s1", "cannot read label 'dash@0.5/p5/s1'; write plain, or POLICY[-rel]@RATIO/START"),
    ("dash@0.5/s2+0.4/s3", "each later gate must halt more of the prompt"),
    ("plain~0.1/0.2", "(block-sparse attention before the first gate; a halting setting may add /LATER"),
    ("dash@0.5/s1~0.1/1.5", "later_density must be a number in (0, 1] (1: dense attention); got 1.5"),
])
def test_a_bad_label_is_one_line_saying_what_to_change(label, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        DashConfig.from_label(label)
    assert "\n" not in str(error.value)


def test_eval_calibrate_and_bench_read_the_same_labels():
    """Today's three readers are one: a negative offset, a relative score and a fractional later
    gate mean the same thing to each, and an unknown policy is refused by each."""
    from dash_prefill.bench.runner import BenchPlan, _methods
    from dash_prefill.calibrate import settings_grid
    from dash_prefill.eval.runner import parse_policies

    label = "dash-rel@0.5/s1/p15o-6"
    expected = DashConfig.from_label(label)
    (eval_label, eval_config), = parse_policies(label)
    (grid_label, grid_config), = settings_grid(["dash-rel/p15o-6"], (1,), (0.5,))
    assert eval_label == grid_label == label
    assert eval_config == dataclasses.replace(expected, protect_last=0)
    assert grid_config == expected
    plan = BenchPlan(targets=[], lengths=[8], batches=[1], settings=[(1, 0.5)], device=None,
                     policies=("dash-rel/p15o-6",))
    assert [m[0] for m in _methods(plan, 4)] == ["plain", "dash", "dash-rel/p15o-6", "hooks"]
    for read in (lambda: parse_policies("fastv@0.5/s1"), lambda: settings_grid(["fastv"], (1,), (0.5,)),
                 lambda: _methods(BenchPlan([], [8], [1], [(1, 0.5)], None, policies=("fastv",)), 4)):
        with pytest.raises(ValueError, match="unknown policy 'fastv'"):
            read()


def test_a_start_layer_option_takes_an_index_or_a_fraction_written_with_d():
    from dash_prefill.bench.cli import parse_settings
    from dash_prefill.calibrate_cli import _starts
    from dash_prefill.cli import start_layer_arg

    assert start_layer_arg("8") == start_layer_arg("s8") == 8 and start_layer_arg("d0.4") == 0.4
    for text in ("0.4", "s0.4"):
        with pytest.raises(argparse.ArgumentTypeError, match="write d0.4 for 0.4 of depth"):
            start_layer_arg(text)
    with pytest.raises(argparse.ArgumentTypeError, match="write s1 for layer index 1"):
        start_layer_arg("1.0")
    assert _starts("d0.6,11") == (0.6, 11)
    assert parse_settings("d0.4:0.5,12:0.75,8:0.3+d0.6:0.75") == [(0.4, 0.5), (12, 0.75), (8, 0.3, ((0.6, 0.75),))]


def test_demo_refuses_a_start_layer_with_a_dot_before_loading_the_model(capsys, monkeypatch):
    from dash_prefill import cli

    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--start-layer", "0.8"])
    assert exit_.value.code == 2 and "write d0.8 for 0.8 of depth" in capsys.readouterr().err


def _committed_records():
    from dash_prefill.eval.runner import read_records

    for path in sorted(ROOT.glob("results/**/results.jsonl")):
        yield from (r for r in read_records(path) if "config" in r)


def test_committed_results_are_found_under_their_labels():
    """Every committed cell is the cell ``dash-prefill eval --policies LABEL`` asks for (labels
    rewritten in this grammar by results/relabel.py); policies removed since are left as they were."""
    from dash_prefill.eval.runner import cell_key, parse_policies, record_key

    found = 0
    for record in _committed_records():
        if record["label"].partition("@")[0].removesuffix("-rel") not in (*POLICIES, "plain"):
            continue
        (label, config), = parse_policies(record["label"])
        key = cell_key(record["kind"], record["model"], record["length"], record["task"], record["sample"],
                       label, config, record["seed"], **record.get("key_extra", {}))
        assert label == record["label"] and key == record_key(record), record["label"]
        found += 1
    assert found > 10000


def test_calibration_profiles_and_rows_are_labelled_by_their_settings():
    paths = [*ROOT.glob("src/dash_prefill/core/profiles/*.json"), *ROOT.glob("results/calibration/**/*.json")]
    assert len(paths) >= 10
    for path in paths:
        data = json.loads(path.read_text())
        rows = data if isinstance(data, list) else data["front"] + [{"label": data["label"], "config": data["setting"]}]
        for row in rows:
            assert DashConfig(**row["config"]).label == row["label"], path


def test_the_readme_writes_labels_and_start_options_the_tools_accept_and_names_the_shipped_profiles():
    from dash_prefill.bench.cli import parse_settings
    from dash_prefill.calibrate_cli import _starts
    from dash_prefill.cli import start_layer_arg

    readme = (ROOT / "README.md").read_text()
    labels = set(re.findall(r"`([a-z-]+@[^`\s]+)`", readme)) - {"dash@0.5"}  # the README's example of an error
    assert len(labels) >= 5
    for label in labels:
        assert DashConfig.from_label(label).label == label
    for path in ROOT.glob("src/dash_prefill/core/profiles/*.json"):
        assert f"`{json.loads(path.read_text())['label']}`" in readme, path.name
    for start in re.findall(r"--start-layer (\S+?)[\]`\s]", readme):
        if start != "7|d0.4":
            start_layer_arg(start)
    for starts in re.findall(r"--starts (\S+?)[\]`\s]", readme):
        _starts(starts)
    for settings in re.findall(r"--settings ([0-9sd.:,+]+)", readme):
        parse_settings(settings)


def test_calibrate_help_names_every_form_its_options_accept():
    from dash_prefill.calibrate_cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    for form in ("NAME[-rel][/pPOOL[oOFFSET]]", "/p47o16", "fractions of depth (d0.4)", "layer indices (11)",
                 "later gates"):
        assert form in text, form


def test_eval_refuses_a_bad_label_before_any_model_loads():
    from dash_prefill.eval import cli as eval_cli

    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--tasks", "vt", "--length", "1k", "--samples", "1",
                              "--policies", "plain,dash@0.5/s0.8"])
    with pytest.raises(ValueError, match="write d0.8 for 0.8 of depth"):
        eval_cli.plan(args)
    assert len(eval_cli.plan(parser.parse_args(["--preset", "full-smollm2"]))) == 2

"""The benchmark: argument parsing, real shapes, the hooks press, measurement, CLI end to end."""

import argparse
import dataclasses
import json

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig

from conftest import build_model, random_ids
from dash_prefill import DashConfig, prefill
from dash_prefill.bench import cli, runner, shapes
from dash_prefill.hf.adapters import output_cache
from dash_prefill.bench.hooks import hooks_prefill
from dash_prefill.bench.timing import cache_bytes, measure, plain_method

# Published parameter counts (Gemma-3-4B: the language model only).
REAL_PARAMETERS = {"llama-3.1-8b": 8.03e9, "qwen2.5-7b": 7.62e9, "qwen3-8b": 8.19e9,
                   "mistral-7b": 7.25e9, "gemma-3-4b": 3.88e9, "smollm2-135m": 1.35e8,
                   "gemma3-270m": 2.68e8}
TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_lengths_parse_k_suffix_as_1024():
    assert cli.parse_lengths("4k,32k") == [4096, 32768]
    assert cli.parse_lengths("512, 1K") == [512, 1024]
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_lengths("4kb")


def test_start_layers_written_with_d_are_fractions_and_bare_ints_are_indices():
    args = _parse(["--arch", "smollm2-135m", "--start-layer", "d0.4,12", "--settings", "d0.25:0.75,3:0.5"])
    assert args.start_layer == [0.4, 12]
    assert args.settings == [(0.25, 0.75), (3, 0.5)]
    from dash_prefill.core.config import start_layer_index
    assert start_layer_index(0.4, 32) == 12 and start_layer_index(12, 32) == 12
    with pytest.raises(ValueError, match="beyond the model"):
        start_layer_index(40, 32)


@pytest.mark.parametrize("arch", sorted(REAL_PARAMETERS))
def test_every_arch_has_the_real_models_parameter_count(arch):
    model = shapes.build_random_model(arch, device="meta")
    assert shapes.parameter_count(model) == pytest.approx(REAL_PARAMETERS[arch], rel=0.03)


def test_arch_configs_keep_their_long_context_and_layer_patterns():
    llama = shapes.arch_config("llama-3.1-8b")
    rope = getattr(llama, "rope_parameters", None) or llama.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    gemma = shapes.arch_config("gemma-3-4b")
    assert gemma.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert gemma.sliding_window == 1024
    assert shapes.arch_config("mistral-7b").sliding_window is None
    for arch in ("llama-3.1-8b", "qwen2.5-7b", "mistral-7b", "gemma-3-4b", "qwen3-8b"):
        assert shapes.arch_config(arch).max_position_embeddings == 131072


def test_random_model_weights_are_finite_and_not_all_equal():
    model = shapes.build_random_model("tiny", torch.float32, "cpu", config=LlamaConfig(**TINY))
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all(), name
        assert parameter.std() > 0, name
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])
def test_hooks_at_zero_ratio_match_plain_logits(family):
    model = build_model(family)
    ids = random_ids(2, 40)
    expected = model(ids, use_cache=True, logits_to_keep=1).logits[:, -1].float()
    logits, _ = hooks_prefill(model, ids, halt_ratio=0.0, start_layer=1)
    assert_close(logits, expected)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_hooks_at_half_ratio_match_dash_logits_and_cache(family):
    model = build_model(family)
    ids = random_ids(2, 160)  # longer than the 4 + 64 protected tokens, so tokens really halt
    logits, cache = hooks_prefill(model, ids, halt_ratio=0.5, start_layer=1, protect_first=4, protect_last=64)
    result = prefill(model, ids, DashConfig(halt_ratio=0.5, start_layer=1, protect_first=4, protect_last=64))
    assert_close(logits, result.logits)
    compared = 0
    for ours, theirs in zip(result.cache.layers[1:], cache.layers[1:]):
        if theirs.keys.shape[2] == ours.keys.shape[2] == 80:  # HF's sliding layers keep only a tail
            assert_close(ours.keys, theirs.keys)
            assert_close(ours.values, theirs.values)
            compared += 1
    assert compared >= 1


def test_measure_reports_ordered_times_and_the_cache_size():
    model = build_model("llama")
    ids = random_ids(1, 32)
    timing = measure(plain_method, model, ids, warmup=1, repeats=3)
    assert 0 < timing.min_s <= timing.median_s <= timing.max_s
    assert (timing.peak_bytes is None) == (ids.device.type == "cpu")  # CUDA only
    cache = output_cache(model(ids, use_cache=True))
    assert timing.kv_cache_bytes == cache_bytes(cache) > 0


@pytest.fixture
def tiny_arch(monkeypatch):
    monkeypatch.setitem(shapes.ARCHITECTURES, "tiny-llama", lambda: LlamaConfig(**TINY))
    return "tiny-llama"


def test_cli_run_writes_json_with_required_fields_and_a_png(tiny_arch, tmp_path, capsys):
    args = _parse(["--arch", tiny_arch, "--lengths", "96,160", "--device", "cpu", "--warmup", "0",
                   "--repeats", "1", "--settings", "d0.4:0.5", "--out", str(tmp_path)])
    assert cli.main(args) == 0
    records = json.loads((tmp_path / "bench.json").read_text())
    head, rows = records[0], records[1:]
    assert head["record"] == "header" and {"machine", "torch", "transformers", "command", "date"} <= head.keys()
    assert [r["method"] for r in rows[:4]] == ["plain", "dash", "dash", "hooks"]
    assert len(rows) == 8
    required = {"arch", "length", "batch", "method", "halt_ratio", "start_layer", "median_s", "min_s",
                "max_s", "peak_bytes", "kv_cache_bytes", "speedup", "ideal_speedup", "efficiency",
                "speedup_over_hooks"}
    for row in rows:
        assert required <= row.keys() and row["status"] == "ok"
    plain, zero, half, hooks = rows[4:]
    assert plain["speedup"] == 1.0 and plain["ideal_speedup"] == 1.0
    assert zero["ideal_speedup"] == pytest.approx(1.0) and zero["halt_ratio"] == 0.0
    assert half["start_layer"] == 2 and half["ideal_speedup"] > 1.0
    assert half["speedup_over_hooks"] == pytest.approx(hooks["median_s"] / half["median_s"])
    assert half["kv_cache_bytes"] < plain["kv_cache_bytes"]
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "plain" in capsys.readouterr().out


def test_length_beyond_the_arch_context_is_a_clear_error(capsys):
    args = _parse(["--arch", "smollm2-135m", "--lengths", "16k", "--device", "cpu"])
    assert cli.main(args) == 2
    assert "at most 8192 tokens" in capsys.readouterr().err


def test_out_of_memory_is_recorded_and_the_run_continues(tiny_arch, monkeypatch):
    real = runner.measure

    def measure_or_oom(fn, model, ids, *rest):
        if fn is runner.plain_method:
            raise torch.cuda.OutOfMemoryError("out of memory")
        return real(fn, model, ids, *rest)
    monkeypatch.setattr(runner, "measure", measure_or_oom)
    plan = runner.BenchPlan(targets=[runner.Target(tiny_arch, lambda: build_model("llama"))], lengths=[32],
                            batches=[1], settings=[(1, 0.5)], device=torch.get_default_device(), warmup=0,
                            repeats=1)
    rows, _ = runner.run_bench(plan)
    assert rows[0]["status"] == "oom" and rows[0]["median_s"] is None and rows[0]["speedup"] is None
    assert all(r["status"] == "ok" and r["median_s"] > 0 for r in rows[1:])


@pytest.mark.parametrize("arch,parameters", [("llava-1.5-7b", 7.06e9), ("qwen2-vl-7b", 8.29e9)])
def test_every_vlm_arch_has_the_real_models_parameter_count(arch, parameters):
    from dash_prefill.bench.vlm import build_random_vlm
    model = build_random_vlm(arch, device="meta")
    assert shapes.parameter_count(model) == pytest.approx(parameters, rel=0.03)


def test_vlm_bench_times_every_method_on_the_same_synthetic_image_prompt(monkeypatch, one_thread):
    import vlms
    from dash_prefill import DashConfig
    from dash_prefill.bench import vlm

    def tiny():
        model = vlms._qwen2_vl()
        return type(model), model.config
    monkeypatch.setitem(vlm.VLM_ARCHITECTURES, "qwen2-vl-7b", tiny)
    rows = vlm.run_vlm_bench(["qwen2-vl-7b"], [64], 24, [(0.5, 0.5)], DashConfig(0.5, 0.5),
                             torch.device("cpu"), torch.float32, warmup=0, repeats=1)
    assert [r["method"] for r in rows] == ["plain", "dash", "dash", "dash-image", "dash+vit"]
    assert all(r["status"] == "ok" and r["image_tokens"] == 64 and r["length"] == 88 for r in rows)
    assert all(r["speedup"] > 0 for r in rows)
    halted = rows[2]
    assert halted["kept_fraction"] < 1.0 and halted["decoder_ideal_speedup"] > 1.0
    assert halted["ideal_speedup"] is None and halted["efficiency"] is None  # encoder not modelled


def test_bench_warns_when_the_repeats_spread_too_wide_to_trust(tiny_arch, monkeypatch, capsys):
    noisy = {"arch": tiny_arch, "batch": 1, "length": 96, "method": "dash", "halt_ratio": 0.5, "status": "ok",
             "min_s": 0.1, "median_s": 0.2, "max_s": 0.9}
    monkeypatch.setattr(cli, "run_bench", lambda plan, on_point=None: ([noisy], []))
    assert cli.main(_parse(["--arch", tiny_arch, "--device", "cpu", "--lengths", "96"])) == 0
    out, err = capsys.readouterr()
    assert "0.2000" in out and "0.1000" in out and "0.9000" in out  # median, min and max of the repeats
    assert "dash ρ=0.5: the repeats spread over 400% of their median" in err


def test_a_long_run_saves_each_finished_length_before_the_next_starts(tiny_arch, tmp_path, monkeypatch):
    seen = []
    real = runner._measure_or_skip

    def measure_and_look(plan, fn, model, ids, name):
        path = tmp_path / "bench.json"
        seen.append((ids.shape[1], json.loads(path.read_text()) if path.exists() else None))
        return real(plan, fn, model, ids, name)
    monkeypatch.setattr(runner, "_measure_or_skip", measure_and_look)
    args = _parse(["--arch", tiny_arch, "--lengths", "96,160", "--device", "cpu", "--warmup", "0", "--repeats", "1",
                   "--settings", "d0.4:0.5", "--no-hooks", "--out", str(tmp_path)])
    assert cli.main(args) == 0
    assert seen[0][1] is None  # nothing saved before the first length is done
    at_160 = [saved for length, saved in seen if length == 160]
    assert at_160 and all({r["length"] for r in saved[1:]} == {96} for saved in at_160)
    assert all(r["speedup"] is not None for r in at_160[0][1:])  # rows saved with their speedups


def test_settings_with_later_gates_parse_and_time_the_gated_prefill(tiny_arch, tmp_path):
    assert cli.parse_settings("d0.4:0.5,1:0.3+3:0.75") == [(0.4, 0.5), (1, 0.3, ((3, 0.75),))]
    args = _parse(["--arch", tiny_arch, "--lengths", "400", "--device", "cpu", "--warmup", "0", "--repeats", "1",
                   "--settings", "1:0.3+3:0.75", "--policies", "attention/p15", "--out", str(tmp_path)])
    assert cli.main(args) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())[1:]
    assert [r["method"] for r in rows] == ["plain", "dash", "attention/p15+0.75/s3"]  # no hooks row: one gate only
    gated = rows[2]
    assert (gated["halt_ratio"], gated["start_layer"], gated["later_gates"]) == (0.3, 1, [[3, 0.75]])
    # The engine run with the same gates: the bench's row keeps what it keeps and has its ideal.
    model, ids = shapes.build_random_model(tiny_arch, device="cpu"), torch.randint(0, 101, (1, 400))
    gates = dict(halt_ratio=0.3, start_layer=1, protect_first=4, protect_last=64, policy="attention", pool=15)
    stats = prefill(model, ids, DashConfig(**gates, later_gates=((3, 0.75),))).stats
    assert gated["kept_fraction"] == stats.kept_tokens[0] / 400 == 100 / 400
    assert gated["ideal_speedup"] == pytest.approx(stats.ideal_speedup)
    assert gated["ideal_speedup"] > prefill(model, ids, DashConfig(**gates)).stats.ideal_speedup


@pytest.mark.parametrize("extra, message", [
    (["--settings", "3:0.3+1:0.75"], "must come after the gate at layer 3"),
    (["--settings", "1:0.5+3:0.25"], "must halt more of the prompt"),
    (["--settings", "1:0.3+3:0.75", "--new-tokens", "4"], "timed by the prefill bench"),
])
def test_bad_later_gates_are_one_clear_line(tiny_arch, capsys, extra, message):
    args = _parse(["--arch", tiny_arch, "--lengths", "96", "--device", "cpu", "--warmup", "0", "--repeats", "1",
                   *extra])
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_bench_policy_with_a_shifted_span_times_the_engine_with_that_offset(tiny_arch):
    from dash_prefill.bench.timing import dash_method
    from dash_prefill.core.config import policy_config

    model, ids = shapes.build_random_model(tiny_arch, device="cpu"), torch.randint(0, 101, (1, 400))
    shifted_config = policy_config("attention/p15o6", 0.5, 1)
    assert (shifted_config.policy, shifted_config.pool, shifted_config.pool_offset) == ("attention", 15, 6)
    shifted = dash_method(0.5, 1, "attention", 15, 6)(model, ids)[0]
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_first=4, protect_last=64, policy="attention", pool=15)
    assert torch.equal(shifted, prefill(model, ids, dataclasses.replace(config, pool_offset=6)).logits)
    assert not torch.equal(shifted, prefill(model, ids, config).logits)


def test_bench_densities_time_each_setting_block_sparse_with_the_engines_ideal(monkeypatch, tmp_path, capsys):
    tiny_arch = "tiny-llama-2k"  # longer than the local band of block-sparse attention
    monkeypatch.setitem(shapes.ARCHITECTURES, tiny_arch, lambda: LlamaConfig(**{**TINY, "max_position_embeddings": 2048}))
    args = _parse(["--arch", tiny_arch, "--lengths", "1800", "--device", "cpu", "--warmup", "0", "--repeats", "1",
                   "--settings", "1:0.5", "--densities", "1,0.1", "--no-hooks", "--out", str(tmp_path)])
    assert cli.main(args) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())[1:]
    assert [r["method"] for r in rows] == ["plain", "dash", "dash", "dash~0.1"]
    model, ids = shapes.build_random_model(tiny_arch, device="cpu"), torch.randint(0, 101, (1, 1800))
    config = DashConfig(halt_ratio=0.5, start_layer=1, protect_first=4, protect_last=64, density=0.1)
    assert rows[3]["ideal_speedup"] == pytest.approx(prefill(model, ids, config).stats.ideal_speedup)
    assert rows[3]["ideal_speedup"] > rows[2]["ideal_speedup"]
    with pytest.raises(SystemExit):
        _parse(["--arch", tiny_arch, "--densities", "0"])
    assert "density must be a number in (0, 1]" in capsys.readouterr().err

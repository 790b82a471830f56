"""dash-prefill: faster long-prompt prefill by Delta Attention Selective Halting (DASH)."""

from .config import DashConfig
from .decode import decode_step
from .prefill import PrefillResult, PrefillStats, prefill, prefill_branches
from .generation import GenerationResult, generate
from .hf_generate import halting
from .loading import load_model
from .profiles import recommended_config, recommended_setting

__all__ = [
    "DashConfig", "GenerationResult", "PrefillResult", "PrefillStats",
    "decode_step", "generate", "halting", "load_model", "prefill", "prefill_branches",
    "recommended_config", "recommended_setting",
]
__version__ = "0.1.0"

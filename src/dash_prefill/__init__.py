"""dash-prefill: faster long-prompt prefill by Delta Attention Selective Halting (DASH)."""

from .config import DashConfig
from .engine import PrefillResult, PrefillStats, decode_step, prefill

__all__ = ["DashConfig", "PrefillResult", "PrefillStats", "decode_step", "prefill"]
__version__ = "0.1.0"

"""Benchmark of DASH prefill: time to first token against the plain HF forward and a hooks press.

Modules: ``shapes`` (real architectures, random weights), ``hooks`` (the kvpress-style
comparison), ``timing`` (per-call measurement), ``runner`` (the grid), ``report`` (table,
JSON, plot), ``cli`` (``dash-prefill bench``).
"""

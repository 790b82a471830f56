"""The halting decision, free of any engine: the setting (``config.DashConfig`` and its labels),
the policies and the selection of the tokens kept at a gate (``policy``), the FLOP cost model
(``cost``) and the recommended setting of a model (``profiles``). The HF engine (``dash_prefill.hf``)
and the vLLM engine (``dash_prefill.vllm``) both apply it."""

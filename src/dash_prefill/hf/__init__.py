"""The Hugging Face transformers engine: the prefill loop over a model's layers (``prefill``), its
cache and masks (``cache``), the per-family adapters (``adapters``), decoding (``decode``,
``static_decode``, ``flash_decode``), ``generate`` and HF's own generate on a DASH prefill
(``halting``), and vision-language models (``multimodal``, ``vision``)."""

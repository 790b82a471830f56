"""Evaluation helpers: RULER-style long-context tasks (see :mod:`dash_prefill.eval.tasks`)."""

from dash_prefill.eval.tasks import (
    OFFLINE_TASKS,
    TASKS,
    Sample,
    aggregate,
    context_and_rest,
    generate_samples,
    prompt_text,
    score,
)

__all__ = [
    "OFFLINE_TASKS",
    "TASKS",
    "Sample",
    "aggregate",
    "context_and_rest",
    "generate_samples",
    "prompt_text",
    "score",
]

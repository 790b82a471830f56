"""RULER-style long-context tasks: deterministic sample generation, length fitting, scoring.

The module is pure: the evaluated model's tokenizer enters only as ``count_tokens(text) -> int``,
so it can be tested with any tokenizer. A prompt is ``context + question + answer_prefix``
(:func:`prompt_text`); the context is the long part (instructions, in-context example and
haystack), the only part that DASH may halt in.

Example
-------
>>> from dash_prefill.eval.tasks import generate_samples, prompt_text, score
>>> samples = generate_samples("niah_single_1", lambda s: len(s.split()), 1024, 2)
>>> score(" The number is " + samples[0].references[0], samples[0].references, "all")
100.0
"""

from __future__ import annotations

import logging
import random
import re
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import numpy as np

from dash_prefill.eval import builders as b
from dash_prefill.eval import haystacks as hs

logger = logging.getLogger(__name__)

Metric = Literal["all", "part"]


@dataclass(frozen=True)
class Sample:
    """One generated prompt with its references.

    Attributes
    ----------
    task : str
        Task name (one of :data:`TASKS`).
    index : int
        Sample index within the generated set.
    context : str
        The long part of the prompt (instructions, example, haystack).
    question : str
        The query that follows the context (starts with its separator, e.g. a newline).
    answer_prefix : str
        Text the answer continues from.
    references : tuple of str
        Strings that a correct answer contains.
    max_new_tokens : int
        Tokens to generate (greedy).
    metric : {"all", "part"}
        ``"all"``: fraction of references found; ``"part"``: any reference found.
    """

    task: str
    index: int
    context: str
    question: str
    answer_prefix: str
    references: tuple[str, ...]
    max_new_tokens: int
    metric: Metric


@dataclass(frozen=True)
class _TaskDef:
    max_new_tokens: int
    metric: Metric
    factory: Callable[[b.Setup], b.Builder]
    needs_data: bool = False


_NIAH = b.NiahConfig
_ESSAY = ("essay", "words", "numbers")
_DEFS: dict[str, _TaskDef] = {
    "niah_single_1": _TaskDef(128, "all", b.niah(_NIAH("repeat", "words", "numbers"))),
    "niah_single_2": _TaskDef(128, "all", b.niah(_NIAH("essay", "words", "numbers")), True),
    "niah_single_3": _TaskDef(128, "all", b.niah(_NIAH("essay", "words", "uuids")), True),
    "niah_multikey_1": _TaskDef(128, "all", b.niah(_NIAH(*_ESSAY, num_k=4)), True),
    "niah_multikey_2": _TaskDef(128, "all", b.niah(_NIAH("needle", "words", "numbers"))),
    "niah_multikey_3": _TaskDef(128, "all", b.niah(_NIAH("needle", "uuids", "uuids"))),
    "niah_multivalue": _TaskDef(128, "all", b.niah(_NIAH(*_ESSAY, num_v=4)), True),
    "niah_multiquery": _TaskDef(128, "all", b.niah(_NIAH(*_ESSAY, num_q=4)), True),
    "vt": _TaskDef(30, "all", b.variable_tracking),
    "cwe": _TaskDef(120, "all", b.common_words),
    "fwe": _TaskDef(50, "all", lambda setup: b.frequent_words(setup, 50)),
    "passkey": _TaskDef(16, "all", b.passkey),
    "qa_1": _TaskDef(32, "part", b.qa(hs.squad), True),
    "qa_2": _TaskDef(32, "part", b.qa(hs.hotpotqa), True),
}

#: All task names.
TASKS: tuple[str, ...] = tuple(_DEFS)
#: Tasks that need no data files (only wonderwords' bundled word lists).
OFFLINE_TASKS: tuple[str, ...] = tuple(t for t, d in _DEFS.items() if not d.needs_data)
#: Tokens to generate per task.
MAX_NEW_TOKENS: dict[str, int] = {t: d.max_new_tokens for t, d in _DEFS.items()}
#: Metric per task.
METRICS: dict[str, Metric] = {t: d.metric for t, d in _DEFS.items()}


def prompt_text(sample: Sample) -> str:
    """Return the full prompt: ``context + question + answer_prefix``.

    Parameters
    ----------
    sample : Sample
        A generated sample.

    Returns
    -------
    str
        The exact text that was length-fitted.
    """
    return sample.context + sample.question + sample.answer_prefix


def context_and_rest(sample: Sample) -> tuple[str, str]:
    """Split a prompt into the haltable context and the rest.

    Parameters
    ----------
    sample : Sample
        A generated sample.

    Returns
    -------
    tuple of str
        ``(context, question + answer_prefix)``; their concatenation is :func:`prompt_text`.
    """
    return sample.context, sample.question + sample.answer_prefix


def _check_task(task: str) -> _TaskDef:
    if task not in _DEFS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return _DEFS[task]


def _rng_factory(task: str, seed: int) -> Callable[[int], b.Rngs]:
    tag = zlib.crc32(task.encode())
    base = seed % 2**64

    def rngs(index: int) -> b.Rngs:
        entropy = [base, tag, index] if index >= 0 else [base, tag, 0, 1]
        seq = np.random.SeedSequence(entropy)
        state = seq.generate_state(4, dtype=np.uint32)
        py_seed = int.from_bytes(state.tobytes(), "little")
        return random.Random(py_seed), np.random.default_rng(seq)

    return rngs


class _Fitter:
    """Builds samples and finds, per sample, the largest unit count that fits the budget."""

    def __init__(self, task: str, tdef: _TaskDef, count_tokens, target_length: int, seed: int):
        self.task, self.tdef, self.count_tokens = task, tdef, count_tokens
        self.target_length = target_length
        self.rngs = _rng_factory(task, seed)
        self.builder = tdef.factory(b.Setup(count_tokens, target_length, self.rngs))
        self.budget = target_length - tdef.max_new_tokens
        self._cache: dict[int, tuple[Sample, int]] = {}
        self.per_unit = 0.0  # tokens per haystack unit, set by estimate()

    def build(self, index: int, n: int) -> tuple[Sample, int]:
        """Return (sample, prompt tokens) for ``n`` haystack units (memoised per sample)."""
        if n not in self._cache:
            parts = self.builder.build(self.rngs(index), index, n)
            sample = Sample(
                self.task, index, parts.context, parts.question, parts.answer_prefix,
                parts.references, self.tdef.max_new_tokens, self.tdef.metric,
            )
            self._cache[n] = (sample, int(self.count_tokens(prompt_text(sample))))
        return self._cache[n]

    def fits(self, index: int, n: int) -> bool:
        return self.build(index, n)[1] <= self.budget

    def estimate(self, lo: int, hi: int) -> int:
        """Estimate the fitting unit count from tokens per unit (two secant steps)."""
        t_lo = self.build(0, lo)[1]
        n1 = min(hi, lo + max(16, lo))
        t1 = self.build(0, n1)[1]
        guess = n1
        for _ in range(2):
            per_unit = max((t1 - t_lo) / max(n1 - lo, 1), 1e-3)
            guess = int(min(hi, max(lo, lo + (self.budget - t_lo) / per_unit)))
            if guess == n1:
                break
            n1, t1 = guess, self.build(0, guess)[1]
        self.per_unit = per_unit
        logger.debug("%s: ~%.2f tokens per unit, estimate %d units", self.task, per_unit, guess)
        return guess

    def fit(self, index: int, guess: int) -> tuple[Sample, int]:
        """Binary-search the largest unit count whose prompt fits; returns (sample, units)."""
        self._cache = {}
        lo_min, hi_max = self.builder.unit_range(index)
        if not self.fits(index, lo_min):
            need = self.build(index, lo_min)[1]
            raise ValueError(
                f"target_length={self.target_length} is too small for task {self.task!r}: the "
                f"smallest prompt takes {need} tokens plus {self.tdef.max_new_tokens} to generate"
            )
        guess = min(max(guess, lo_min), hi_max)
        if self.per_unit > 0:  # one secant step with the estimated tokens per unit
            slack = self.budget - self.build(index, guess)[1]
            guess = min(max(guess + int(slack / self.per_unit), lo_min), hi_max)
        step = max(1, guess // 1024)
        if self.fits(index, guess):  # walk up until it no longer fits
            lo, hi = guess, None
            while hi is None:
                if lo == hi_max:
                    return self.build(index, lo)[0], lo
                probe = min(hi_max, lo + step)
                if self.fits(index, probe):
                    lo, step = probe, step * 2
                else:
                    hi = probe
        else:  # walk down until it fits
            hi, lo = guess, None
            while lo is None:
                probe = max(lo_min, hi - step)
                if self.fits(index, probe):
                    lo = probe
                else:
                    hi, step = probe, step * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.fits(index, mid) else (lo, mid)
        return self.build(index, lo)[0], lo


def generate_samples(
    task: str,
    count_tokens: Callable[[str], int],
    target_length: int,
    num_samples: int,
    seed: int = 42,
) -> list[Sample]:
    """Generate length-fitted samples of one task, deterministically.

    Parameters
    ----------
    task : str
        One of :data:`TASKS`.
    count_tokens : callable
        ``count_tokens(text) -> int``: the evaluated model's token count for a prompt
        (count special tokens such as BOS here if the evaluator adds them).
    target_length : int
        Maximum of prompt tokens + ``max_new_tokens`` per sample.
    num_samples : int
        Number of samples (at least 1).
    seed : int, optional
        Base seed (default 42); each sample's RNGs mix in the task and sample index.

    Returns
    -------
    list of Sample
        For each, ``count_tokens(prompt_text(s)) + s.max_new_tokens <= target_length`` with the
        largest haystack that fits.

    Raises
    ------
    ValueError
        For an unknown task, ``num_samples < 1``, or a target length too small for the template.
    """
    tdef = _check_task(task)
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if target_length <= tdef.max_new_tokens:
        raise ValueError(
            f"target_length={target_length} is too small for task {task!r}: it must exceed "
            f"max_new_tokens={tdef.max_new_tokens}"
        )
    fitter = _Fitter(task, tdef, count_tokens, target_length, seed)
    lo, hi = fitter.builder.unit_range(0)
    if not fitter.fits(0, lo):
        fitter.fit(0, lo)  # raises the "too small" error
    guess = fitter.estimate(lo, hi)
    samples = []
    for index in range(num_samples):
        sample, units = fitter.fit(index, guess)
        guess = units
        samples.append(sample)
        tokens = fitter.build(index, units)[1]
        logger.debug("%s[%d]: %d units, %d tokens", task, index, units, tokens)
    logger.info("generated %d %s samples for target length %d", num_samples, task, target_length)
    return samples


_CONTROL = re.compile(r"[\x00-\x1f]")


def score(prediction: str, references: Sequence[str], metric: Metric) -> float:
    """Score one prediction the RULER way, from 0 to 100.

    The prediction is stripped, control characters (U+0000-U+001F) are replaced by newlines
    (as RULER's post-processing does), and each reference is tested as a case-insensitive
    substring.

    Parameters
    ----------
    prediction : str
        Generated text.
    references : sequence of str
        Expected strings (at least one).
    metric : {"all", "part"}
        ``"all"``: 100 x fraction of references found; ``"part"``: 100 if any is found.

    Returns
    -------
    float
        The per-sample score.
    """
    if metric not in ("all", "part"):
        raise ValueError(f"unknown metric {metric!r}; expected 'all' or 'part'")
    if isinstance(references, str):
        references = (references,)
    if len(references) == 0:
        raise ValueError("references must not be empty")
    text = _CONTROL.sub("\n", (prediction or "").strip()).strip().lower()
    found = [ref.lower() in text for ref in references]
    if metric == "all":
        return 100.0 * sum(found) / len(found)
    return 100.0 if any(found) else 0.0


def aggregate(scores: Iterable[float]) -> float:
    """Return the mean of per-sample scores.

    Parameters
    ----------
    scores : iterable of float
        Per-sample scores from :func:`score`.

    Returns
    -------
    float
        Their mean (0..100).
    """
    values = [float(s) for s in scores]
    if not values:
        raise ValueError("cannot aggregate an empty list of scores")
    return sum(values) / len(values)

"""Per-task prompt builders for the RULER-style tasks.

A builder turns (per-sample RNGs, sample index, haystack unit count) into the prompt parts; the
length fitting that picks the unit count lives in :mod:`dash_prefill.eval.tasks`. Builders are
pure functions of their arguments, so rebuilding with the same RNG seeds and unit count gives
the same text.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dash_prefill.eval import haystacks as hs

CountTokens = Callable[[str], int]
Rngs = tuple[random.Random, np.random.Generator]


@dataclass(frozen=True)
class Parts:
    """The text parts of one prompt and its references."""

    context: str
    question: str
    answer_prefix: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class Builder:
    """How to build one task's prompts: ``build(rngs, index, units)`` and the unit range."""

    build: Callable[[Rngs, int, int], Parts]
    unit_range: Callable[[int], tuple[int, int]]


@dataclass(frozen=True)
class Setup:
    """What a builder factory may use: the tokenizer, the target length and fresh RNGs."""

    count_tokens: CountTokens
    target_length: int
    rngs: Callable[[int], Rngs]  # rngs(index) -> fresh seeded RNGs; index -1 for task setup


# --------------------------------------------------------------------------------- NIAH
@dataclass(frozen=True)
class NiahConfig:
    haystack: str  # "repeat" (noise sentences), "essay", or "needle" (distractor needles)
    type_k: str  # kind of keys: "words" or "uuids"
    type_v: str  # kind of values: "numbers" or "uuids"
    num_k: int = 1  # needles with distinct keys
    num_v: int = 1  # values per key
    num_q: int = 1  # keys asked for


def _insert_by_depth(sentences: list[str], needles: list[str], rng: random.Random) -> str:
    depths = sorted(rng.sample(hs.DEPTHS, len(needles)))
    positions = [int(len(sentences) * d / 100) for d in depths]
    pieces, last = [], 0
    for pos, needle in zip(positions, needles):
        pieces.append(" ".join(sentences[last:pos]))
        pieces.append(needle)
        last = pos
    pieces.append(" ".join(sentences[last:]))
    return " ".join(p for p in pieces if p)


def _insert_at_random(units: list[str], needles: list[str], rng: random.Random) -> list[str]:
    units = list(units)
    indexes = sorted(rng.sample(range(len(units)), len(needles)), reverse=True)
    for i, needle in zip(indexes, needles):
        units.insert(i, needle)
    return units


def niah(cfg: NiahConfig) -> Callable[[Setup], Builder]:
    """Return a builder factory for a needle-in-a-haystack configuration."""
    num_k = max(cfg.num_k, cfg.num_q)
    num_needles = num_k * cfg.num_v
    plural = cfg.num_q * cfg.num_v > 1
    t = cfg.type_v if plural else cfg.type_v[:-1]
    if plural:
        header = (
            f"Some special magic {t} are hidden within the following text. Make sure to "
            f"memorize it. I will quiz you about the {t} afterwards.\n"
        )
    else:
        header = (
            f"A special magic {t} is hidden within the following text. Make sure to "
            f"memorize it. I will quiz you about the {t} afterwards.\n"
        )

    def build(rngs: Rngs, index: int, n: int) -> Parts:
        rng = rngs[0]
        keys: list[str] = []
        values: list[list[str]] = []
        needles: list[str] = []
        used: set[str] = set()
        while len(keys) < num_k:
            key = hs.random_value(rng, cfg.type_k)
            if key in used:
                continue
            used.add(key)
            keys.append(key)
            vals: list[str] = []
            while len(vals) < cfg.num_v:
                v = hs.random_value(rng, cfg.type_v)
                if v not in vals:
                    vals.append(v)
            values.append(vals)
            needles += [hs.NEEDLE.format(type_v=cfg.type_v, key=key, value=v) for v in vals]
        rng.shuffle(needles)

        if cfg.haystack == "essay":
            sentences = hs.split_sentences(" ".join(hs.essay_words()[:n]))
            haystack = _insert_by_depth(sentences, needles, rng)
        else:
            if cfg.haystack == "repeat":
                units = [hs.NOISE] * n
            else:
                units = []
                while len(units) < n:
                    key = hs.random_value(rng, cfg.type_k)
                    if key in used:  # a distractor must not reuse a real key
                        continue
                    value = hs.random_value(rng, cfg.type_v)
                    units.append(hs.NEEDLE.format(type_v=cfg.type_v, key=key, value=value))
            haystack = "\n".join(_insert_at_random(units, needles, rng))

        asked = rng.sample(range(num_k), cfg.num_q)
        queries = [keys[i] for i in asked]
        answers = tuple(v for i in asked for v in values[i])
        query = queries[-1]
        if len(queries) > 1:
            query = ", ".join(queries[:-1]) + ", and " + query
        verb = "are all the" if plural else "is the"
        question = f"\nWhat {verb} special magic {t} for {query} mentioned in the provided text?"
        prefix = f" The special magic {t} for {query} mentioned in the provided text " + (
            "are" if plural else "is"
        )
        return Parts(header + haystack, question, prefix, answers)

    def factory(setup: Setup) -> Builder:
        if cfg.haystack == "essay":
            hi = len(hs.essay_words())
            return Builder(build, lambda index: (1, hi))
        return Builder(build, lambda index: (num_needles, max(num_needles, setup.target_length)))

    return factory


# ------------------------------------------------------------------------------ passkey
_PASSKEY_HEADER = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there.\n"
)


def passkey(setup: Setup) -> Builder:
    """Builder for the pass-key retrieval task (5-digit key among noise sentences)."""

    def build(rngs: Rngs, index: int, n: int) -> Parts:
        rng = rngs[0]
        key = hs.random_number(rng, digits=5)
        units = [hs.NOISE] * n
        line = f"The pass key is {key}. Remember it. {key} is the pass key."
        units.insert(rng.randint(0, n), line)
        context = _PASSKEY_HEADER + " ".join(units)
        return Parts(context, "\nWhat is the pass key?", " The pass key is", (key,))

    return Builder(build, lambda index: (1, max(1, setup.target_length)))


# --------------------------------------------------------------------- variable tracking
_VT_HEADER = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
)
_VT_HOPS = 4
_VT_ICL_LENGTH = 500  # RULER fits its in-context example to 500 tokens (incl. 30 to generate)


def _vt_question(value: str) -> str:
    return f"\nQuestion: Find all variables that are assigned the value {value} in the text above."


def _vt_prefix(value: str) -> str:
    # "assgined" is RULER's spelling; kept so prompts match the published benchmark.
    return (
        " Answer: According to the chain(s) of variable assignment in the text above, "
        f"{_VT_HOPS + 1} variables are assgined the value {value}, they are: "
    )


def _vt_chain(rngs: Rngs, name_len: int, avoid: set[str]) -> tuple[list[str], str, list[str]]:
    rng, nprng = rngs
    names: list[str] = []
    while len(names) < _VT_HOPS + 1:
        name = hs.random_upper(rng, name_len)
        if name not in names and name not in avoid:
            names.append(name)
    value = str(int(nprng.integers(10000, 99999)))
    while value in avoid:
        value = str(int(nprng.integers(10000, 99999)))
    chain = [f"VAR {names[0]} = {value}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(_VT_HOPS)]
    return names, value, chain


def _vt_text(rng: random.Random, n: int, chain: list[str]) -> str:
    sentences = [hs.NOISE + "\n"] * n
    positions = sorted(rng.sample(range(n), len(chain)))
    for j, pos in enumerate(positions):
        sentences.insert(pos + j, chain[j])
    return " ".join(sentences).replace(". \n", ".\n")


def variable_tracking(setup: Setup) -> Builder:
    """Builder for variable tracking: 1 chain of 4 hops, after one in-context example."""
    min_noise = _VT_HOPS + 1

    def example(rngs: Rngs, n: int) -> tuple[str, set[str]]:
        names, value, chain = _vt_chain(rngs, 3, set())
        text = _VT_HEADER + _vt_text(rngs[0], n, chain) + _vt_question(value) + _vt_prefix(value)
        return text + " ".join(names) + "\n\n", set(names) | {value}

    # Fit the example's noise count once, like RULER (which then only renames its variables).
    budget = min(_VT_ICL_LENGTH, setup.target_length // 2) - 30

    def icl_fits(n: int) -> bool:
        return setup.count_tokens(example(setup.rngs(-1), n)[0]) <= budget

    lo, hi = min_noise, min_noise
    while hi < 4096 and icl_fits(hi * 2):
        hi *= 2
    hi *= 2
    if icl_fits(lo):
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if icl_fits(mid) else (lo, mid)
    icl_noise = lo

    def build(rngs: Rngs, index: int, n: int) -> Parts:
        icl, used = example(rngs, icl_noise)
        names, value, chain = _vt_chain(rngs, 5, used)
        context = icl + _VT_HEADER + _vt_text(rngs[0], n, chain)
        return Parts(context, _vt_question(value), _vt_prefix(value), tuple(names))

    return Builder(build, lambda index: (min_noise, max(min_noise, setup.target_length)))


# -------------------------------------------------------------------------- common words
_CWE_HEADER = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
_CWE_QUESTION = "\nQuestion: What are the 10 most common words in the above list?"
_CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
_CWE_NUM = 10


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def common_words(setup: Setup) -> Builder:
    """Builder for common-words extraction (RULER's shorter repeats below 4096 tokens)."""
    if setup.target_length < 4096:
        ex_words, ex_common, ex_rare, common, rare = 20, 3, 1, 6, 1
    else:
        ex_words, ex_common, ex_rare, common, rare = 40, 10, 3, 30, 3
    vocab = hs.common_words()

    def listing(rng: random.Random, words: list[str], rc: int, ru: int) -> tuple[str, list[str]]:
        top = words[:_CWE_NUM]
        items = top * rc + words[_CWE_NUM:] * ru
        rng.shuffle(items)
        return _numbered(items), top

    def build(rngs: Rngs, index: int, n: int) -> Parts:
        rng = rngs[0]
        chosen = rng.sample(vocab, n + ex_words)  # example words disjoint from the real list
        main, ex = chosen[:n], chosen[n:]
        ex_text, ex_top = listing(rng, ex, ex_common, ex_rare)
        text, top = listing(rng, main, common, rare)
        answer = " " + _numbered(ex_top)
        example = _CWE_HEADER + ex_text + _CWE_QUESTION + _CWE_PREFIX + answer + "\n"
        return Parts(example + _CWE_HEADER + text, _CWE_QUESTION, _CWE_PREFIX, tuple(top))

    return Builder(build, lambda index: (_CWE_NUM, len(vocab) - ex_words))


# ------------------------------------------------------------------------ frequent words
_FWE_HEADER = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. "
)
_FWE_QUESTION = (
    "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the "
    "three most frequently appeared words in the above coded text?"
)
_FWE_PREFIX = (
    " Answer: According to the coded text above, the three most frequently appeared words are:"
)
_FWE_NOISE = "..."  # RULER's code uses three dots although the question says '....'
_ZETA2 = math.pi**2 / 6
FWE_MIN_WORDS = 200  # smallest Zipf total for which ranks 2..5 have distinct counts


def fwe_vocab_size(target_length: int, max_new_tokens: int) -> int:
    """Vocabulary size for frequent-words extraction: (target - to_generate) // 50."""
    return (target_length - max_new_tokens) // 50


def frequent_words(setup: Setup, max_new_tokens: int) -> Builder:
    """Builder for frequent-words extraction: Zipf(2) counts over random 6-letter words."""
    vocab_size = fwe_vocab_size(setup.target_length, max_new_tokens)
    if vocab_size < 5:
        raise ValueError(
            f"target_length={setup.target_length} is too small for task 'fwe' "
            f"(vocabulary size {vocab_size} < 5)"
        )

    def build(rngs: Rngs, index: int, n: int) -> Parts:
        rng = rngs[0]
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add(hs.random_coded_word(rng))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = _FWE_NOISE
        words = [w for k, w in enumerate(ranked, 1) for _ in range(int(n * k**-2.0 / _ZETA2))]
        rng.shuffle(words)
        return Parts(_FWE_HEADER + " ".join(words), _FWE_QUESTION, _FWE_PREFIX, tuple(ranked[1:4]))

    hi = max(FWE_MIN_WORDS, 64 * setup.target_length)
    return Builder(build, lambda index: (FWE_MIN_WORDS, hi))


# ------------------------------------------------------------------------------------- QA
_QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words."
)


QaLoader = Callable[[], tuple[tuple[dict, ...], tuple[str, ...]]]


def qa(loader: QaLoader) -> Callable[[Setup], Builder]:
    """Return a builder factory for a QA data set (gold paragraph(s) among distractors)."""

    def factory(setup: Setup) -> Builder:
        qas, docs = loader()

        def build(rngs: Rngs, index: int, n: int) -> Parts:
            rng = rngs[0]
            item = qas[index % len(qas)]
            gold, more = list(item["context"]), list(item["more_context"])
            if n >= len(docs):
                chosen = list(range(len(docs)))
            elif n - len(gold) <= len(more):
                chosen = gold + rng.sample(more, n - len(gold))
            else:
                taken = set(gold) | set(more)
                extra: list[int] = []
                need = n - len(taken)
                if need > len(docs) // 2:
                    pool = [i for i in range(len(docs)) if i not in taken]
                    extra = rng.sample(pool, need)
                else:  # rejection sampling: much faster than building the pool each time
                    while len(extra) < need:
                        i = rng.randrange(len(docs))
                        if i not in taken:
                            taken.add(i)
                            extra.append(i)
                chosen = gold + more + extra
            rng.shuffle(chosen)
            documents = "\n\n".join(f"Document {i + 1}:\n{docs[d]}" for i, d in enumerate(chosen))
            context = f"{_QA_INSTRUCTION}\n\nThe following are given documents.\n\n{documents}"
            question = f"\n\n{_QA_INSTRUCTION}\n\nQuestion: {item['query']}"
            refs = tuple(dict.fromkeys(item["outputs"]))
            return Parts(context, question, " Answer:", refs)

        return Builder(build, lambda index: (len(qas[index % len(qas)]["context"]), len(docs)))

    return factory

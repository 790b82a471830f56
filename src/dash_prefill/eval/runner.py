"""Task accuracy under halting: the kvpress protocol on the RULER-style tasks, resumable.

Protocol (as in NVIDIA kvpress): a prompt is ``context + question + answer_prefix``; only the
context may be halted. Each sample's ``protect_last`` is raised to the token count of
everything after the context (question, answer prefix and any chat-template suffix), so the
question is never halted. If the tokenizer has a chat template, ``context + question`` is the
user message and the answer prefix follows the generation prompt; otherwise the raw text is
used. Decoding is greedy up to the task's ``max_new_tokens`` or EOS; scoring is RULER's.

Every policy of one sample runs from one shared trunk (:func:`prefill_branches`). Results go to
a JSONL file, one record per (model, length, task, sample, policy label, config, seed), appended
after every sample; a re-run skips the cells already there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from dash_prefill.core.config import DashConfig
from dash_prefill.hf.prefill import PrefillResult, prefill_branches
from dash_prefill.hf.generation import continue_decoding, stop_token_ids
from dash_prefill.eval.tasks import Sample, generate_samples, score

logger = logging.getLogger(__name__)

PLAIN = DashConfig(halt_ratio=0.0, policy="none", protect_last=0)


def parse_policies(text: str, start_layer: int | float | None = None,
                   calibrated: DashConfig | None = None) -> list[tuple[str, DashConfig]]:
    """``"plain,dash@0.5/d0.4"`` -> [(label, config), ...], each label as
    :attr:`DashConfig.label` writes it (the key of its results). ``start_layer`` is the start of
    labels that name none (None: they are an error); ``calibrated`` stands for the given config
    (the model's recommended setting), so its cells are shared with the grid.

    ``protect_last`` is 0 here: the evaluation sets it per sample to the question's length.
    """
    labels = [item.strip() for item in text.split(",") if item.strip()]
    if "calibrated" in labels and calibrated is None:
        raise ValueError("the label 'calibrated' needs the model's recommended setting")
    configs = [dataclasses.replace(DashConfig.from_label(calibrated.label if label == "calibrated" else label,
                                                         start_layer), protect_last=0) for label in labels]
    return [(config.label, config) for config in configs]


# ---------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of a sample's prompt and how many of its last tokens follow the context."""

    ids: list[int]
    tail_tokens: int
    chat_template: bool


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, user: str) -> str:
    messages = [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(tokenizer, text: str) -> list[int]:
    # A chat template writes its own BOS; the tokenizer must not add a second one.
    if _has_template(tokenizer):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def token_counter(tokenizer) -> Callable[[str], int]:
    """``count_tokens(prompt_text)`` for length fitting, chat-template tokens included."""
    if _has_template(tokenizer):
        return lambda text: len(_encode(tokenizer, _render(tokenizer, text)))
    return lambda text: len(_encode(tokenizer, text))


def sample_text(tokenizer, sample: Sample) -> str:
    """The exact prompt text of a sample: ``context + question`` as the user turn of the chat
    template (when the tokenizer has one), then the answer prefix."""
    if _has_template(tokenizer):
        return _render(tokenizer, sample.context + sample.question) + sample.answer_prefix
    return sample.context + sample.question + sample.answer_prefix


def encode_sample(tokenizer, sample: Sample) -> EncodedPrompt:
    """Tokenize a sample's prompt and count the tokens after its context.

    The tail is found as the tokens after the longest common prefix of the full prompt and the
    prompt cut right after the context, so merges across the boundary are counted as tail.
    """
    templated = _has_template(tokenizer)
    text = sample_text(tokenizer, sample)
    at = text.find(sample.context)
    context = sample.context if at >= 0 else sample.context.strip()
    at = text.find(context)
    if at < 0:
        raise ValueError("the chat template changed the context text; cannot locate the question")
    ids = _encode(tokenizer, text)
    head = _encode(tokenizer, text[: at + len(context)])
    common = 0
    for a, b in zip(ids, head):
        if a != b:
            break
        common += 1
    return EncodedPrompt(ids, len(ids) - common, templated)


def greedy_tokens(model, state: PrefillResult, max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy continuation of one prefilled row (batch 1), EOS included when reached."""
    return continue_decoding(model, state, state.logits.argmax(-1), max_new_tokens, stop)[0]


def provenance(model) -> dict:
    """Where a record was computed: the device's name and the weights' dtype (not in cell keys)."""
    weight = next(model.parameters())
    name = torch.cuda.get_device_name(weight.device) if weight.device.type == "cuda" else "cpu"
    return {"device": name, "dtype": str(weight.dtype).removeprefix("torch.")}


def sample_configs(policies, sample: Sample, prompt: EncodedPrompt) -> list[DashConfig]:
    """Per-sample configs: protect the tail; the random control draws anew per sample."""
    configs = []
    for _, config in policies:
        changes = {"protect_last": max(config.protect_last, prompt.tail_tokens)}
        if config.policy == "random":
            changes["seed"] = config.seed + sample.index
        configs.append(dataclasses.replace(config, **changes))
    return configs


# ---------------------------------------------------------------------------- results file


def cell_key(kind: str, model_name: str, length: int, task: str, index: int, label: str,
             config: DashConfig | dict, seed: int, **extra) -> str:
    """The identity of one result cell, as a canonical JSON string.

    Config fields missing from older records take their defaults and fields DashConfig no longer
    has are left out, so adding a field with a default to DashConfig, or removing one, does not
    invalidate finished cells.
    """
    given = config.as_dict() if isinstance(config, DashConfig) else config
    fields = {f.name: given.get(f.name, f.default) for f in dataclasses.fields(DashConfig)}
    return json.dumps([kind, model_name, length, task, index, label, fields, seed, extra],
                      sort_keys=True)


def record_key(record: dict) -> str:
    return cell_key(record["kind"], record["model"], record["length"], record["task"],
                    record["sample"], record["label"], record["config"], record["seed"],
                    **record.get("key_extra", {}))


def read_records(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL results file; a torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s:%d is not valid JSON (interrupted write?); skipped", path, number)
    return records


def append_records(path: str | os.PathLike, records: list[dict]) -> None:
    """Append records and flush them to disk (crash-safe)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------- evaluation


def evaluate(model, tokenizer, model_name: str, tasks, target_length: int, num_samples: int,
             policies: list[tuple[str, DashConfig]], results_path, seed: int = 42) -> list[dict]:
    """Score every policy on the same samples of every task; resume from ``results_path``.

    Parameters
    ----------
    model, tokenizer : a supported causal LM and its tokenizer.
    model_name : str
        Name recorded in the results (part of a cell's key).
    tasks : sequence of str
        Task names (see :data:`dash_prefill.eval.tasks.TASKS`).
    target_length : int
        Prompt tokens + max new tokens per sample.
    num_samples : int
        Samples per task.
    policies : list of (label, DashConfig)
        E.g. from :func:`parse_policies`; ``protect_last`` is raised per sample to the tail.
    results_path : path
        JSONL file; cells already in it are skipped, new ones appended after every sample.
    seed : int
        Seed of the sample generators.

    Returns
    -------
    list of dict
        One record per requested cell (loaded or computed).
    """
    labels = [label for label, _ in policies]
    if len(set(labels)) != len(labels):
        raise ValueError(f"policy labels must be unique; got {labels}")
    done = {record_key(r): r for r in read_records(results_path)}
    keys = {(task, i, label): cell_key("task", model_name, target_length, task, i, label, config, seed)
            for task in tasks for i in range(num_samples) for label, config in policies}
    missing = {cell for cell, key in keys.items() if key not in done}
    logger.info("%d of %d cells already in %s", len(keys) - len(missing), len(keys), results_path)
    stop = stop_token_ids(model, tokenizer)
    count_tokens = token_counter(tokenizer)
    where = provenance(model)
    progress = tqdm(total=len(tasks) * num_samples, desc=f"{model_name} {target_length}", unit="sample")
    for task in tasks:
        todo = [i for i in range(num_samples) if any((task, i, label) in missing for label in labels)]
        progress.update(num_samples - len(todo))
        if not todo:
            continue
        samples = generate_samples(task, count_tokens, target_length, max(todo) + 1, seed)
        for i in todo:
            progress.set_postfix_str(task)
            chosen = [(label, config) for label, config in policies if (task, i, label) in missing]
            records = run_sample(model, tokenizer, samples[i], chosen, stop)
            for record, (label, config) in zip(records, chosen):
                record.update(model=model_name, length=target_length, seed=seed, label=label,
                              config=config.as_dict(), **where)
                done[keys[task, i, label]] = record
            append_records(results_path, records)
            progress.update(1)
    progress.close()
    return [done[key] for key in keys.values()]


def run_sample(model, tokenizer, sample: Sample, policies, stop: set[int]) -> list[dict]:
    """Prefill one sample under every policy from one trunk, decode greedily, score."""
    prompt = encode_sample(tokenizer, sample)
    configs = sample_configs(policies, sample, prompt)
    ids = torch.tensor([prompt.ids])
    records = []
    for config, state in zip(configs, prefill_branches(model, ids, configs)):
        tokens = greedy_tokens(model, state, sample.max_new_tokens, stop)
        prediction = tokenizer.decode(tokens, skip_special_tokens=True)
        records.append({
            "kind": "task", "task": sample.task, "sample": sample.index,
            "prediction": prediction, "references": list(sample.references),
            "score": score(prediction, sample.references, sample.metric),
            "prompt_tokens": state.stats.prompt_tokens[0], "kept_tokens": state.stats.kept_tokens[0],
            "protect_last": config.protect_last, "start_layer_index": state.stats.start_layer,
            "ideal_speedup": state.stats.ideal_speedup,
            "kv_saved_fraction": state.stats.kv_saved_fraction,
            "new_tokens": len(tokens), "chat_template": prompt.chat_template,
        })
    return records

"""Calibration: measure halting settings on a model and pick the fastest one that stays faithful.

The paper tunes the start layer and the ratio per model with a perplexity proxy; this module
does it for any policy. On calibration prompts, every setting of a grid (policy x start layer
x ratio) is compared with plain prefill on a held-out continuation, teacher-forced: the mean
KL(plain || halted) of the next-token distributions over the continuation's tokens, the share
of them whose top-1 token agrees, and the change in the continuation's negative
log-likelihood. The fastest setting by the cost model whose KL and agreement stay within the
budget is chosen and written as a profile (JSON) that :func:`recommended_config` reads.

Built-in prompts (no task of the evaluation): essay text of the requested length, half of them
"recall" prompts (the end of the prompt quotes the first words of a sentence from anywhere in
the text and asks for the rest of it word for word, so halting that sentence shows), half
plain continuation of the text (local context).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dash_prefill.core.config import DashConfig, policy_config
from dash_prefill.hf.decode import decode_step, extend
from dash_prefill.hf.prefill import prefill_branches
from dash_prefill.core.profiles import PROFILE_FIELDS

logger = logging.getLogger(__name__)

DEFAULT_POLICIES = ("dash", "dash/p15", "attention/p15", "dash-question/p15", "contribution/p15")
DEFAULT_STARTS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
DEFAULT_RATIOS = (0.25, 0.5, 0.75, 0.9)


class BudgetNotMetError(ValueError):
    """No setting of the grid stays within the fidelity budget."""


@dataclass(frozen=True)
class CalibrationPrompt:
    """Token ids of a prompt, the held-out continuation that follows it, and how many of the
    prompt's last tokens are the question (always kept)."""

    ids: list[int]
    continuation: list[int]
    protect_last: int
    kind: str


@dataclass(frozen=True)
class Budget:
    """Largest mean KL (nats per continuation token) and smallest top-1 agreement allowed."""

    max_kl: float = 0.02
    min_agreement: float = 0.95

    def __post_init__(self):
        if not self.max_kl > 0:
            raise ValueError(f"the KL budget must be > 0 nats; got {self.max_kl}")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(f"the top-1 agreement budget must be in [0, 1]; got {self.min_agreement}")

    def met(self, row: dict) -> bool:
        return row["kl"] <= self.max_kl and row["top1_agreement"] >= self.min_agreement


# ---------------------------------------------------------------------------- prompts


def builtin_prompts(tokenizer, length: int, count: int, seed: int = 0,
                    continuation_tokens: int = 24) -> list[CalibrationPrompt]:
    """``count`` prompts of about ``length`` tokens from the essays: recall and continuation
    alternating, each with a held-out continuation of up to ``continuation_tokens``."""
    from dash_prefill.data import essay_words

    words = essay_words()
    rng = random.Random(seed)
    prompts = []
    for i in range(count):
        budget = length - continuation_tokens - 48
        start = rng.randrange(0, len(words) - 4 * length)
        text, n = "", 0
        step = max(budget // 2, 64)
        while True:  # grow the window of words until it fills the token budget
            candidate = " ".join(words[start:start + n + step])
            if len(tokenizer(candidate, add_special_tokens=False)["input_ids"]) > budget:
                if step <= 8:
                    break
                step //= 2
                continue
            text, n = candidate, n + step
        if i % 2 == 0:
            prompts.append(_recall_prompt(tokenizer, text, rng, continuation_tokens))
        else:
            rest = " " + " ".join(words[start + n:start + n + 4 * continuation_tokens])
            ids = tokenizer(text)["input_ids"]
            follow = tokenizer(rest, add_special_tokens=False)["input_ids"][:continuation_tokens]
            prompts.append(CalibrationPrompt(list(ids), list(follow), 64, "continue"))
    return prompts


def _recall_prompt(tokenizer, text: str, rng: random.Random, continuation_tokens: int) -> CalibrationPrompt:
    from dash_prefill.eval.haystacks import split_sentences

    sentences = [s for s in split_sentences(text) if len(s.split()) >= 12]
    if not sentences:
        raise ValueError("a calibration text has no sentence of 12 words or more")
    sentence = sentences[int(rng.uniform(0.1, 0.9) * len(sentences))]
    head = " ".join(sentence.split()[:6])
    question = (f"\n\nAbove, one sentence begins with \"{head}\". Repeat that sentence word "
                f"for word.\nSentence: \"{head}")
    ids = tokenizer(text + question)["input_ids"]
    tail = len(ids) - len(tokenizer(text)["input_ids"])
    rest = " " + " ".join(sentence.split()[6:])
    follow = tokenizer(rest, add_special_tokens=False)["input_ids"][:continuation_tokens]
    return CalibrationPrompt(list(ids), list(follow), max(tail, 1), "recall")


def read_prompts(path, tokenizer, continuation_tokens: int = 24) -> list[CalibrationPrompt]:
    """Prompts from a JSONL file: one object per line with ``context`` (required),
    ``question`` (appended to the context and always kept; optional) and ``continuation``
    (held-out text that follows; optional, else the greedy continuation of plain prefill)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            context = item["context"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: each line must be a JSON object with a \"context\" "
                             "string (and optionally \"question\", \"continuation\")") from None
        question = item.get("question", "")
        ids = tokenizer(context + question)["input_ids"]
        tail = len(ids) - len(tokenizer(context)["input_ids"]) if question else 64
        follow = item.get("continuation")
        follow = [] if follow is None else tokenizer(follow, add_special_tokens=False)["input_ids"]
        prompts.append(CalibrationPrompt(list(ids), list(follow[:continuation_tokens]), max(tail, 1), "user"))
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt")
    return prompts


# ---------------------------------------------------------------------------- measurement


def settings_grid(policies=DEFAULT_POLICIES, starts=DEFAULT_STARTS, ratios=DEFAULT_RATIOS,
                  labels=(), densities=(1.0,)) -> list[tuple[str, DashConfig]]:
    """(label, config) for every policy x start x ratio x density; a policy is a label's policy
    and pooling, ``NAME[-rel][/pPOOL[oOFFSET]]`` (``attention/p15``); a density below 1 makes the
    attention before the gate block-sparse. ``labels`` adds whole settings
    (:meth:`DashConfig.from_label`) for what the grid cannot span: later gates
    (``attention@0.3/s8/p47o16+0.75/s14``). Every label is :attr:`DashConfig.label`, so a
    choice can be evaluated under the same name."""
    grid = [dataclasses.replace(policy_config(item, ratio, start), density=density)
            for item in policies for start in starts for ratio in ratios for density in densities]
    for label in labels:
        config = DashConfig.from_label(label)
        if config.halt_ratio == 0.0:
            raise ValueError(f"--settings {label!r} halts nothing; calibration compares halting settings "
                             f"with plain prefill itself")
        grid.append(config)
    if not grid:
        raise ValueError("the calibration grid is empty: give at least one policy, start and ratio, "
                         "or --settings")
    return [(config.label, config) for config in grid]


def _log_probs(model, state, continuation: list[int], count: int) -> torch.Tensor:
    """Next-token log-probabilities (count, vocab) at the prompt's end and after each of the
    first ``count - 1`` continuation tokens, teacher-forced in one step; advances ``state``."""
    rows = [state.logits[0].double().log_softmax(-1)[None]]
    if count > 1:
        ids = torch.tensor([continuation[:count - 1]], device=state.logits.device)
        rows.append(extend(model, state, ids)[0].double().log_softmax(-1))
    return torch.cat(rows)


@torch.no_grad()
def measure(model, prompts: list[CalibrationPrompt], grid, num_tokens: int = 24) -> list[dict]:
    """Fidelity of every setting against plain prefill, averaged over ``prompts``.

    Returns one row per setting: ``label``, ``config``, ``kl`` (mean nats per continuation
    token), ``top1_agreement``, ``nll_change`` (mean, nats per token; only over prompts with a
    held-out continuation), ``ideal_speedup`` (cost model, mean over prompts).
    """
    plain = DashConfig(halt_ratio=0.0, policy="none")
    sums = {label: {"kl": 0.0, "agree": 0.0, "nll": 0.0, "nll_n": 0, "speedup": 0.0} for label, _ in grid}
    device = next(model.parameters()).device
    for prompt in tqdm(prompts, desc="calibration prompts", unit="prompt"):
        configs = [plain] + [dataclasses.replace(c, protect_last=prompt.protect_last) for _, c in grid]
        states = prefill_branches(model, torch.tensor([prompt.ids], device=device), configs)
        given = prompt.continuation
        count = len(given) if given else num_tokens
        if given:
            reference = _log_probs(model, states[0], given, count)
        else:  # no held-out text: the greedy continuation of plain prefill is the reference
            logits, given = [states[0].logits[0]], []
            for _ in range(count - 1):
                given.append(int(logits[-1].argmax()))
                ids = torch.tensor([[given[-1]]], device=device)
                logits.append(decode_step(model, states[0], ids)[0])
            given.append(int(logits[-1].argmax()))
            reference = torch.stack(logits).double().log_softmax(-1)
        targets = torch.tensor(given[:count], device=reference.device)
        reference_nll = -reference.gather(1, targets[:, None]).mean()
        for (label, _), state in zip(grid, states[1:]):
            ours = _log_probs(model, state, given, count)
            entry = sums[label]
            entry["kl"] += float((reference.exp() * (reference - ours)).sum(-1).clamp_min(0).mean())
            entry["agree"] += float((reference.argmax(-1) == ours.argmax(-1)).double().mean())
            if prompt.continuation:
                entry["nll"] += float(-ours.gather(1, targets[:, None]).mean() - reference_nll)
                entry["nll_n"] += 1
            entry["speedup"] += state.stats.ideal_speedup
    rows = []
    for label, config in grid:
        entry, n = sums[label], len(prompts)
        rows.append({"label": label, "config": _setting(config), "kl": entry["kl"] / n,
                     "top1_agreement": entry["agree"] / n,
                     "nll_change": entry["nll"] / entry["nll_n"] if entry["nll_n"] else None,
                     "ideal_speedup": entry["speedup"] / n})
    return rows


def choose(rows: list[dict], budget: Budget) -> dict:
    """The fastest row (ideal speedup) within ``budget``, ties to the lower KL.
    BudgetNotMetError names the setting that came closest when none is within it."""
    within = [r for r in rows if budget.met(r)]
    if within:
        return max(within, key=lambda r: (round(r["ideal_speedup"], 3), -r["kl"]))
    closest = min(rows, key=lambda r: max(r["kl"] / budget.max_kl, (1 - r["top1_agreement"])
                                          / max(1 - budget.min_agreement, 1e-9)))
    raise BudgetNotMetError(
        f"no setting keeps KL <= {budget.max_kl} and top-1 agreement >= {budget.min_agreement}; "
        f"closest: {closest['label']} (KL {closest['kl']:.3f}, agreement "
        f"{closest['top1_agreement']:.2f}, {closest['ideal_speedup']:.2f}x); widen the budget or the grid")


def _setting(config: DashConfig) -> dict:
    return {name: getattr(config, name) for name in PROFILE_FIELDS}


# ---------------------------------------------------------------------------- profiles


def write_profile(path, model_name: str, chosen: dict, rows: list[dict], budget: Budget, about: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"model": model_name, "setting": chosen["config"], "label": chosen["label"],
               "fidelity": {k: chosen[k] for k in ("kl", "top1_agreement", "nll_change")},
               "ideal_speedup": chosen["ideal_speedup"], "budget": dataclasses.asdict(budget),
               **about, "front": rows}
    path.write_text(json.dumps(profile, indent=1) + "\n")
    return path


def front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both ideal speedup and KL, fastest first."""
    ordered = sorted(rows, key=lambda r: (-r["ideal_speedup"], r["kl"]))
    best, kept = float("inf"), []
    for row in ordered:
        if row["kl"] < best:
            kept.append(row)
            best = row["kl"]
    return kept


def _group(label: str) -> str:
    """The policy part of a grid label: ``attention@0.5/d0.4/p15`` -> ``attention/p15``."""
    return re.sub(r"@[^/]+/[sd][^/+]+", "", label)


def plot(rows: list[dict], chosen: dict | None, path) -> Path:
    """KL against ideal speedup, one colour per policy, the front dashed, the choice circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group in sorted({_group(r["label"]) for r in rows}):
        mine = [r for r in rows if _group(r["label"]) == group]
        ax.scatter([r["ideal_speedup"] for r in mine], [r["kl"] for r in mine], label=group, s=18)
    edge = front(rows)
    ax.plot([r["ideal_speedup"] for r in edge], [r["kl"] for r in edge], "k--", lw=0.8, label="front")
    if chosen is not None:
        ax.scatter([chosen["ideal_speedup"]], [chosen["kl"]], s=160, facecolors="none", edgecolors="red",
                   label=f"chosen: {chosen['label']}")
    ax.set_xlabel("ideal speedup (cost model)")
    ax.set_ylabel("mean KL(plain || halted), nats/token")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def table(rows: list[dict], chosen: dict | None = None, limit: int = 12) -> str:
    """The front (fastest first) as a text table, the chosen setting marked."""
    lines = [f"{'setting':32s} {'ideal':>6s} {'KL':>7s} {'top-1':>6s} {'dNLL':>7s}"]
    for row in front(rows)[:limit]:
        mark = "  <- chosen" if chosen is not None and row["label"] == chosen["label"] else ""
        nll = "" if row["nll_change"] is None else f"{row['nll_change']:+7.3f}"
        lines.append(f"{row['label']:32s} {row['ideal_speedup']:5.2f}x {row['kl']:7.3f} "
                     f"{row['top1_agreement']:6.2f} {nll:>7s}{mark}")
    return "\n".join(lines)

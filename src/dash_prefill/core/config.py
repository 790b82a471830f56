"""DashConfig: the hyper-parameters of DASH prefill, validated at construction."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from dash_prefill.core.policy import POLICIES as _REGISTERED

POLICIES = (*_REGISTERED, "none")
SCORES = ("absolute", "relative")
ELIGIBLE = ("all", "image")


_NUMBER = r"[0-9][0-9.e-]*"  # read by _number and parse_start_layer, which say what is wrong
_START = rf"[sd]{_NUMBER}"
_LABEL = re.compile(rf"(?P<policy>[a-z][a-z-]*?)(?P<relative>-rel)?@(?P<ratio>{_NUMBER})(?:/(?P<start>{_START}))?"
                    rf"(?:/p(?P<pool>[0-9]+)(?:o(?P<offset>-?[0-9]+))?)?(?P<gates>(?:\+{_NUMBER}/{_START})*)"
                    rf"(?:~(?P<density>{_NUMBER})(?:/(?P<later_density>{_NUMBER}))?)?")
_PLAIN = re.compile(rf"plain(?:~(?P<density>{_NUMBER}))?")
LABEL_GRAMMAR = ("plain, or POLICY[-rel]@RATIO/START[/pPOOL[oOFFSET]][+RATIO/START...], each optionally "
                 "ending in ~DENSITY (block-sparse attention before the first gate; a halting setting "
                 "may add /LATER, the density after it), with START sLAYER (a layer index, s8) or "
                 "dFRACTION (a fraction of depth, d0.4), e.g. dash@0.5/d0.4, attention@0.75/s14/p63~0.1, "
                 "attention@0.3/d0.25+0.75/d0.5~0.05/0.1, plain~0.1")


@dataclass(frozen=True)
class DashConfig:
    """Settings of Delta Attention Selective Halting (Chen et al., arXiv 2604.18103).

    Parameters
    ----------
    halt_ratio : float
        ρ in [0, 1): fraction of each row's prompt tokens halted at the start layer.
    start_layer : int or float
        Layer whose attention update ||U_t|| decides the halting. An int is a layer index;
        a float in (0, 1) is a fraction of depth (``int(start_layer * num_layers)``). The type
        tells them apart: 1.0 is refused (layer 1 is the int 1).
    protect_first : int
        The first prompt tokens (attention sinks) are always kept active.
    protect_last : int
        The last prompt tokens (usually the question) are always kept active. The very last
        token is kept whatever this value is: its logits start decoding.
    policy : str
        A name in ``policy.POLICIES``, or "none" (plain prefill). "dash" ranks tokens by their
        attention update (the paper); "random" halts the same number of tokens at random (the
        control); "attention" ranks tokens by the attention they receive from the question
        window, the last ``max(protect_last, 1)`` prompt tokens, at the start layer (FastV /
        GemFilter; with ``pool`` the SnapKV / FastKV pooled ranking); "contribution" weights
        that attention by each token's value norm; "dash-question" multiplies the ranks of
        ||U|| and of the question's attention. "dash" and "random" are query-agnostic.
    score : {"absolute", "relative"}
        "absolute" is ||U_t||₂ (the paper); "relative" is ||U_t||₂ / ||h_t||₂.
    seed : int
        Seed of the random policy.
    pool : int
        Odd width of a sliding maximum applied to the scores before selection (1: none): a
        token is kept when a token within ``pool // 2`` of it ranks high, so spans (a number,
        a phrase) stay whole.
    pool_offset : int
        Shifts the span a high-ranked token keeps by this many tokens toward what follows it
        (|pool_offset| <= pool // 2; 0: centred). A needle's value follows the key the
        question names, so a span placed after the key holds it with fewer tokens.
    eligible : {"all", "image"}
        Which tokens may halt. "all": any unprotected prompt token, ρ is a fraction of the
        prompt. "image" (vision-language models): only image/video tokens, ρ is a fraction of
        them, text is always kept (the authors' setting for multimodal models).
    later_gates : tuple of (start_layer, halt_ratio) pairs
        Gates after the first (the start layer): at each, the same policy ranks the tokens
        still computed and halts more of them, so that ``halt_ratio`` of the prompt is halted
        from there on (a fraction of the prompt, not of the survivors). Each gate lies after the
        one before and halts more. Empty (the paper): one gate.
    density : float
        In (0, 1]: the fraction of key blocks each query block attends in the layers before the
        first gate (every layer for plain prefill), block-sparse (:mod:`dash_prefill.core.sparse`:
        the question's attention picks the blocks, the first block and the local ones are always
        kept). 1.0 (default): dense, exact attention. Full-attention layers only.
    later_density : float
        In (0, 1]: the same for the full-attention layers after the first gate, over the tokens
        still computed, except the gate layers themselves (their attention is the score). 1.0
        (default): dense. Needs a halting policy and text prompts (``eligible="all"``).
    """

    halt_ratio: float = 0.5
    start_layer: int | float = 0.4
    protect_first: int = 4
    protect_last: int = 64
    policy: str = "dash"
    score: str = "absolute"
    seed: int = 0
    eligible: str = "all"
    pool: int = 1
    pool_offset: int = 0
    later_gates: tuple[tuple[int | float, float], ...] = ()
    density: float = 1.0
    later_density: float = 1.0

    def __post_init__(self) -> None:
        for name in ("density", "later_density"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be a number in (0, 1] (1: dense attention); got {value!r}")
        if isinstance(self.halt_ratio, bool) or not isinstance(self.halt_ratio, (int, float)):
            raise ValueError(f"halt_ratio must be a number in [0, 1); got {self.halt_ratio!r}")
        if not 0.0 <= self.halt_ratio < 1.0:
            raise ValueError(f"halt_ratio must be in [0, 1); got {self.halt_ratio}")
        _check_start(self.start_layer)
        self._check_later_gates()
        for name in ("protect_first", "protect_last", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0; got {value!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}; got {self.policy!r}")
        if self.eligible not in ELIGIBLE:
            raise ValueError(f"eligible must be one of {ELIGIBLE}; got {self.eligible!r}")
        if isinstance(self.pool, bool) or not isinstance(self.pool, int) or self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd int >= 1 (1: no pooling); got {self.pool!r}")
        if (isinstance(self.pool_offset, bool) or not isinstance(self.pool_offset, int)
                or abs(self.pool_offset) > self.pool // 2):
            raise ValueError(f"pool_offset must be an int with |pool_offset| <= pool // 2 = {self.pool // 2}; "
                             f"got {self.pool_offset!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}; got {self.score!r}")
        if self.later_density < 1.0 and (not self.scores_tokens or self.eligible != "all"):
            raise ValueError("later_density < 1 (block-sparse attention after the first gate) needs a halting "
                             "policy and eligible='all'; plain prefill has no gate: set density instead")

    def _check_later_gates(self) -> None:
        gates = self.later_gates
        if isinstance(gates, list) and all(isinstance(g, (list, tuple)) for g in gates):  # read from JSON
            gates = tuple(tuple(g) for g in gates)
            object.__setattr__(self, "later_gates", gates)
        if not isinstance(gates, tuple) or not all(isinstance(g, tuple) and len(g) == 2 for g in gates):
            raise ValueError(f"later_gates must be a tuple of (start_layer, halt_ratio) pairs, e.g. "
                             f"((0.6, 0.9),); got {gates!r}")
        ratio = self.halt_ratio
        for start, later in gates:
            _check_start(start)
            if isinstance(later, bool) or not isinstance(later, (int, float)) or not ratio < later < 1.0:
                raise ValueError(f"each later gate must halt more of the prompt than the gate before "
                                 f"(a halt_ratio in ({ratio}, 1)); got {later!r}")
            ratio = later
        if gates and self.eligible != "all":
            raise ValueError("later_gates work with eligible='all' only")

    def as_dict(self) -> dict:
        """The fields, for a JSON record; ``later_gates`` only when there are some (so records
        of one-gate settings read as before)."""
        fields = dataclasses.asdict(self)
        if not self.later_gates:
            del fields["later_gates"]
        for name in ("density", "later_density"):
            if fields[name] == 1.0:
                del fields[name]
        return fields

    @property
    def label(self) -> str:
        """The setting as one short name, which :meth:`from_label` reads back: ``plain``, or
        ``POLICY[-rel]@RATIO/START[/pPOOL[oOFFSET]][+RATIO/START...]`` where START is ``sLAYER``
        (a layer index) or ``dFRACTION`` (a fraction of depth): ``dash@0.5/d0.4``,
        ``attention@0.3/s8/p47o16+0.75/s14``; ``~DENSITY`` at the end when the attention before
        the first gate is block-sparse (``plain~0.1``, ``dash@0.5/d0.4~0.2``), ``~DENSITY/LATER``
        when the layers after it are as well (``dash@0.5/d0.4~1.0/0.1``). protect_first,
        protect_last, seed and eligible are not part of it."""
        sparse = f"~{float(self.density)}" if self.density < 1.0 or self.later_density < 1.0 else ""
        sparse += f"/{float(self.later_density)}" if self.later_density < 1.0 else ""
        if not self.scores_tokens:
            return "plain" + sparse
        name = self.policy + ("-rel" if self.score == "relative" else "")
        pool = f"/p{self.pool}" + (f"o{self.pool_offset}" if self.pool_offset else "") if self.pool > 1 else ""
        return (f"{name}@{float(self.halt_ratio)}/{start_text(self.start_layer)}{pool}"
                + gates_label(self.later_gates) + sparse)

    @classmethod
    def from_label(cls, label: str, start_layer: int | float | None = None) -> DashConfig:
        """The config a label names (the grammar of :attr:`label`); the fields a label does not
        name keep their defaults. ``start_layer`` is the start of a label that names none; when
        it is None such a label is an error. ValueError saying what to change otherwise."""
        text = label.strip()
        plain = _PLAIN.fullmatch(text)
        match = plain or _LABEL.fullmatch(text)
        if match is None:
            raise ValueError(f"cannot read label {text!r}; write {LABEL_GRAMMAR}")
        if not plain and match["policy"] not in _REGISTERED:
            raise ValueError(f"label {text!r}: unknown policy {match['policy']!r}; use one of "
                             f"{', '.join(_REGISTERED)}, or plain for plain prefill")
        try:
            density = 1.0 if match["density"] is None else _number(match["density"])
            later_density = 1.0 if plain or match["later_density"] is None else _number(match["later_density"])
            if plain:
                return cls(halt_ratio=0.0, policy="none", density=density)
            if match["start"] is None and start_layer is None:
                raise ValueError("no start layer: add /sLAYER (a layer index, /s8) or /dFRACTION "
                                 "(a fraction of depth, /d0.4) after the ratio")
            gates = tuple((parse_start_layer(start), _number(ratio))
                          for ratio, start in (gate.split("/") for gate in match["gates"].split("+")[1:]))
            return cls(halt_ratio=_number(match["ratio"]), policy=match["policy"],
                       start_layer=start_layer if match["start"] is None else parse_start_layer(match["start"]),
                       score="relative" if match["relative"] else "absolute", pool=int(match["pool"] or 1),
                       pool_offset=int(match["offset"] or 0), later_gates=gates, density=density,
                       later_density=later_density)
        except ValueError as error:
            raise ValueError(f"label {text!r}: {error}") from None

    @property
    def scores_tokens(self) -> bool:
        """Whether a policy scores the tokens at a start layer (any policy but "none"); at
        ρ=0 it scores them and halts none."""
        return self.policy != "none"

    def resolve_start_layer(self, num_layers: int) -> int:
        """The start layer as an index for a model with ``num_layers`` decoder layers."""
        return start_layer_index(self.start_layer, num_layers)

    def resolve_gates(self, num_layers: int) -> list[tuple[int, float]]:
        """Every gate as (layer index, halt_ratio), the start layer first; ValueError unless
        each gate lies after the one before."""
        gates = [(self.resolve_start_layer(num_layers), self.halt_ratio)]
        for start, ratio in self.later_gates:
            layer = start_layer_index(start, num_layers)
            if layer <= gates[-1][0]:
                raise ValueError(f"later gate at layer {layer} (start_layer={start}) must come after the "
                                 f"gate at layer {gates[-1][0]}; with {num_layers} layers use a later one")
            gates.append((layer, ratio))
        return gates


def gates_label(gates) -> str:
    """"+0.75/s14" per later (start_layer, halt_ratio) gate, as labels write them
    (``attention@0.3/s8/p63+0.75/s14``)."""
    return "".join(f"+{float(ratio)}/{start_text(start)}" for start, ratio in gates)


def policy_config(policy: str, halt_ratio: float, start_layer: int | float, later_gates=()) -> DashConfig:
    """One setting of a grid (bench and calibrate ``--policies``): ``policy`` is a label's policy
    and pooling, ``NAME[-rel][/pPOOL[oOFFSET]]`` (``attention/p15o6``), read as the label it
    makes with the ratio, start and later gates."""
    name, slash, pooling = policy.strip().partition("/")
    label = f"{name}@{float(halt_ratio)}/{start_text(start_layer)}{slash}{pooling}{gates_label(later_gates)}"
    try:
        return DashConfig.from_label(label)
    except ValueError as error:
        raise ValueError(f"policy {policy!r} (write NAME[-rel][/pPOOL[oOFFSET]], e.g. attention/p15): "
                         f"{error}") from None


def _check_start(start) -> None:
    if isinstance(start, bool) or not isinstance(start, (int, float)):
        raise ValueError(f"start_layer must be an int layer index or a float in (0, 1); got {start!r}")
    if isinstance(start, int) and start < 0:
        raise ValueError(f"start_layer must be >= 0; got {start}")
    if isinstance(start, float) and start.is_integer():
        raise ValueError(f"start_layer={start!r} is a float, which means a fraction of depth in (0, 1); "
                         f"for layer {int(start)} pass the int {int(start)}")
    if isinstance(start, float) and not 0.0 < start < 1.0:
        raise ValueError(f"start_layer as a float is a fraction of depth and must be in (0, 1); got {start}")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def start_text(start: int | float) -> str:
    """A start layer as labels write it: ``s8`` (layer index 8) or ``d0.4`` (0.4 of depth)."""
    return f"s{start}" if isinstance(start, int) else f"d{start!r}"


def parse_start_layer(text: str) -> int | float:
    """A start layer as labels write it, ``s8`` (layer index 8) or ``d0.4`` (0.4 of depth); a bare
    ``8`` is ``s8`` (command lines). ValueError saying what to write for anything else (``s0.8``,
    ``0.8``, ``d8``)."""
    text = text.strip()
    letter, number = (text[0], text[1:]) if text[:1] in ("s", "d") else ("s", text)
    value = float(number) if re.fullmatch(r"[0-9]*\.?[0-9]+(e-?[0-9]+)?", number) else None
    if letter == "s" and re.fullmatch(r"[0-9]+", number):
        return int(number)
    if letter == "d" and value is not None and 0.0 < value < 1.0:
        return value
    if letter == "s" and value is not None and 0.0 < value < 1.0:
        raise ValueError(f"start layer {text!r} is not a layer index: write d{number} for {number} of depth")
    if value is not None and value.is_integer():
        raise ValueError(f"start layer {text!r}: write s{int(value)} for layer index {int(value)} "
                         f"(a fraction of depth is in (0, 1), e.g. d0.4)")
    raise ValueError(f"cannot read start layer {text!r}: write s8 for layer index 8 or d0.4 for 0.4 of depth")


def start_layer_index(start_layer: int | float, num_layers: int) -> int:
    """A start layer as a layer index: a float in (0, 1) is a fraction of depth
    (``int(start_layer * num_layers)``), an int must lie inside the model."""
    if isinstance(start_layer, float):
        return int(start_layer * num_layers)
    if not 0 <= start_layer < num_layers:
        raise ValueError(
            f"start_layer={start_layer} is beyond the model, which has {num_layers} layers; "
            f"use an index in [0, {num_layers - 1}] or a fraction of depth such as 0.4"
        )
    return start_layer

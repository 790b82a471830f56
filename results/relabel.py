"""One-off (issue 28): rewrite the labels of the committed results in the grammar of DashConfig.label.

Old labels wrote a start layer as ``/s0.6`` (a fraction of depth) or ``/s14`` (a layer index) and
could leave it out (then the record's config holds the start the run used). New labels always
name it, ``/d0.6`` for a fraction, ``/s14`` for an index, and write the ratio as a float. The start
is read from each record's config; a label that names one must agree with it. Only the label
strings change (``git diff --stat`` shows the files; ``--check`` lists what would change).

    python results/relabel.py [--check]
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD = re.compile(r"(?P<name>[a-z-]+)@(?P<ratio>[0-9.]+)(?:/s(?P<start>[0-9.]+))?(?P<pool>(?:/p[0-9]+(?:o-?[0-9]+)?)?)"
                 r"(?P<gates>(?:\+[0-9.]+/s[0-9.]+)*)")


def _old_start(text: str):
    return float(text) if "." in text else int(text)


def _start(value) -> str:
    return f"s{value}" if isinstance(value, int) else f"d{value!r}"


def relabel(label: str, config: dict) -> str:
    """The new label of a record's old ``label`` run with ``config``."""
    if label == "plain":
        return label
    match = OLD.fullmatch(label)
    if match is None:
        raise ValueError(f"unknown label form {label!r}")
    start = config["start_layer"]
    if match["start"] is not None and _old_start(match["start"]) != start:
        raise ValueError(f"{label!r} names start {match['start']} but ran at {start}")
    if float(match["ratio"]) != config["halt_ratio"]:
        raise ValueError(f"{label!r} names ratio {match['ratio']} but ran at {config['halt_ratio']}")
    gates = "".join(f"+{float(ratio)}/{_start(_old_start(at))}"
                    for ratio, at in re.findall(r"\+([0-9.]+)/s([0-9.]+)", match["gates"]))
    return f"{match['name']}@{float(match['ratio'])}/{_start(start)}{match['pool']}{gates}"


def _replace(text: str, old: str, new: str) -> str:
    return text.replace(f'"label": "{old}"', f'"label": "{new}"')


def relabel_jsonl(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines(keepends=True):
        record = json.loads(line) if line.strip() else {}
        if "label" in record and "config" in record:
            new = relabel(record["label"], record["config"])
            if new != record["label"]:
                assert line.count(f'"label": "{record["label"]}"') == 1, (path, line)
                line = _replace(line, record["label"], new)
        lines.append(line)
    return lines


def relabel_json(path: Path) -> str:
    """A calibration profile or its rows: every row's label from its config, the profile's own
    label from its setting."""
    data = json.loads(path.read_text())
    rows = data if isinstance(data, list) else data.get("front", [])
    pairs = [(row["label"], row["config"]) for row in rows]
    if isinstance(data, dict) and "label" in data:
        pairs.append((data["label"], data["setting"]))
    mapping = {}
    for old, config in pairs:
        new = relabel(old, config)
        if mapping.setdefault(old, new) != new:
            raise ValueError(f"{path}: label {old!r} ran with two starts")
    text = path.read_text()
    for old, new in mapping.items():
        text = _replace(text, old, new)
    return text


def main(check: bool) -> None:
    jsonl = sorted(ROOT.glob("results/**/*.jsonl"))
    profiles = sorted(ROOT.glob("results/calibration/**/*.json")) + sorted(ROOT.glob("src/dash_prefill/profiles/*.json"))
    for path in jsonl + profiles:
        text = "".join(relabel_jsonl(path)) if path.suffix == ".jsonl" else relabel_json(path)
        if text != path.read_text():
            print(f"{'would relabel' if check else 'relabelled'} {path.relative_to(ROOT)}")
            if not check:
                path.write_text(text)


if __name__ == "__main__":
    main("--check" in sys.argv[1:])

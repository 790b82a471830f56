"""Join results.jsonl files into one, keeping the first record of each cell.

Usage: python scripts/merge_results.py OUT.jsonl IN.jsonl [IN.jsonl ...]
Then `dash-prefill eval --report-only --out DIR` renders OUT's directory.
"""

import sys
from pathlib import Path

from dash_prefill.eval.runner import append_records, read_records, record_key


def main(out: str, *inputs: str) -> None:
    seen = {record_key(r) for r in read_records(out)}
    new = []
    for path in inputs:
        for record in read_records(path):
            if record_key(record) not in seen:
                seen.add(record_key(record))
                new.append(record)
    append_records(out, new)
    print(f"{out}: +{len(new)} records ({len(seen)} cells)")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    Path(sys.argv[1]).parent.mkdir(parents=True, exist_ok=True)
    main(*sys.argv[1:])

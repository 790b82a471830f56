#!/usr/bin/env bash
# Set up (if needed) and run the test suite (unit tests on tiny random models, plus
# integration tests on the embedded SmolLM2-135M) on the CPU. Skipped tests are listed with
# their reasons (-rs: GPU-only tests, optional packages). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
echo "test: running the suite (pytest -q -rs $*)"
exec .venv/bin/python -m pytest -q -rs "$@"

#!/usr/bin/env bash
# Set up (if needed) and run the test suite (unit tests on tiny random models, plus
# integration tests on the embedded SmolLM2-135M). CPU only; a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "setup: installing the test-only requirements (requirements-test.txt)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
exec .venv/bin/python -m pytest -q "$@"

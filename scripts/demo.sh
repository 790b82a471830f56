#!/usr/bin/env bash
# Set up (if needed) and run the main job: plain vs DASH prefill on the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dash-prefill demo "$@"

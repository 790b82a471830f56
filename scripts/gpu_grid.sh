#!/usr/bin/env bash
# One `dash-prefill eval` process per task on one CUDA GPU, each resuming from committed results
# and stopped after SECONDS (results are appended per sample, so a stopped process keeps them).
#
# Usage: scripts/gpu_grid.sh WORK SECONDS DONE.jsonl EVAL_ARGS...
#   EVAL_ARGS  the eval options other than --tasks, --out and --device (e.g. --model gemma3-270m
#              --dtype float32 --length 8k --samples 10 --start-layer d0.4 --policies ...)
#   TASKS      (environment) the tasks, one process each (default: all 14)
# Models must be set up first (scripts/gpu_setup.sh). Then join the parts:
#   python scripts/merge_results.py DONE.jsonl WORK/*/results.jsonl
set -uo pipefail
work=${1:?usage: scripts/gpu_grid.sh WORK SECONDS DONE.jsonl EVAL_ARGS...}; limit=${2:?}; done_cells=${3:?}; shift 3
export PYTHONPATH="/tmp/site:src" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
TASKS=${TASKS:-"niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multikey_3
niah_multivalue niah_multiquery vt cwe fwe passkey qa_1 qa_2"}
for task in $TASKS; do
  mkdir -p "$work/$task"
  [ -f "$work/$task/results.jsonl" ] || cp "$done_cells" "$work/$task/results.jsonl"
  timeout "$limit" python3 -m dash_prefill.cli eval --device cuda --tasks "$task" --out "$work/$task" "$@" \
    >"$work/$task.log" 2>&1 &
done
wait
for task in $TASKS; do printf '%s: %s\n' "$task" "$(tail -c 300 "$work/$task.log" | tr '\r' '\n' | grep -v '^$' | tail -1)"; done

#!/usr/bin/env bash
# Gemma-3-270M accuracy on one CUDA GPU within a time limit, as parallel `dash-prefill eval`
# processes (3 tasks x 10 samples at 8K, two policy groups; fidelity at 4K).
#
# Usage: scripts/eval_gpu_gemma.sh OUT_DIR SECONDS
# Every process stops after SECONDS (results are appended per sample, so a stopped process
# keeps what it finished); scripts/merge_results.py then joins the parts.
# Gemma-3-270M: transformers before 5.24 converts its GGUF tokenizer wrongly and load_model
# refuses it; copy tokenizer.json and tokenizer_config.json converted by 5.24 into
# ~/.cache/dash_prefill/gemma3-270m-<sha> first (EVAL.md says how its numbers were made).
set -uo pipefail
out=${1:?usage: scripts/eval_gpu_gemma.sh OUT_DIR SECONDS}
limit=${2:?usage: scripts/eval_gpu_gemma.sh OUT_DIR SECONDS}
mkdir -p "$out/parts"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

EARLY="plain,dash@0.5,dash@0.75,random@0.5,random@0.75"
LATE="dash@0.5/s0.6,dash@0.5/s0.8,random@0.5/s0.8"
run() {  # run NAME ARGS... in the background, stopped after $limit seconds
  local name=$1; shift
  timeout "$limit" python3 -m dash_prefill.cli eval --device cuda --dtype float32 \
    --model gemma3-270m --out "$out/parts/$name" "$@" >"$out/parts/$name.log" 2>&1 &
}
for task in niah_single_1 vt fwe; do
  run "$task-early" --length 8k --samples 10 --tasks $task --policies $EARLY
  run "$task-late" --length 8k --samples 10 --tasks $task --policies $LATE
done
run fidelity --length 4k --samples 0 --tasks all --policies "plain,dash@0.5,dash@0.5/s0.8,random@0.5/s0.8" --fidelity 56
wait
python3 scripts/merge_results.py "$out/results.jsonl" "$out"/parts/*/results.jsonl

#!/usr/bin/env bash
# Gemma-3-270M's accuracy grid of EVAL.md on one CUDA GPU within a time limit, as parallel
# `dash-prefill eval` processes: every task at 8K (plain, DASH and random at rho 0.5/0.75;
# DASH and random at rho 0.5 from start 0.8), three tasks at 16K, the start sweep on three tasks
# and fidelity on 56 prompts at 4K.
#
# Usage: scripts/eval_gpu_gemma.sh OUT_DIR SECONDS [DONE.jsonl]
# Every process stops after SECONDS (results are appended per sample, so a stopped process
# keeps what it finished). With DONE.jsonl (e.g. results/eval/gemma3-270m/results.jsonl) every
# process starts from a copy of it and skips the cells it holds, so a run resumes an earlier
# one. scripts/merge_results.py then joins the parts into OUT_DIR/results.jsonl.
# Processes for the start-0.8 and sweep cells run at lower priority than the main grid.
# transformers before 5.24 converts Gemma's GGUF tokenizer wrongly and load_model refuses it;
# copy tokenizer.json and tokenizer_config.json converted by 5.24 into
# ~/.cache/dash_prefill/gemma3-270m-<sha> first (EVAL.md says how its numbers were made).
set -uo pipefail
out=${1:?usage: scripts/eval_gpu_gemma.sh OUT_DIR SECONDS [DONE.jsonl]}
limit=${2:?usage: scripts/eval_gpu_gemma.sh OUT_DIR SECONDS [DONE.jsonl]}
done_cells=${3:-}
mkdir -p "$out/parts"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

TASKS="niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multikey_3
niah_multivalue niah_multiquery vt cwe fwe passkey qa_1 qa_2"
QUICK="niah_single_1 vt fwe"
MAIN="plain,dash@0.5,dash@0.75,random@0.5,random@0.75"
LATE="dash@0.5/d0.8,random@0.5/d0.8"
SWEEP="dash@0.5/d0.6"
run() {  # run NICENESS NAME ARGS... in the background, stopped after $limit seconds
  local niceness=$1 name=$2; shift 2
  mkdir -p "$out/parts/$name"
  [ -n "$done_cells" ] && cp "$done_cells" "$out/parts/$name/results.jsonl"
  nice -n "$niceness" timeout "$limit" python3 -m dash_prefill.cli eval --device cuda \
    --dtype float32 --model gemma3-270m --out "$out/parts/$name" "$@" >"$out/parts/$name.log" 2>&1 &
}
for task in $TASKS; do
  run 0 "8k-$task" --length 8k --samples 10 --tasks "$task" --policies "$MAIN"
done
for task in $QUICK; do
  run 0 "16k-$task" --length 16k --samples 10 --tasks "$task" --policies "$MAIN"
done
for task in $TASKS; do
  run 10 "8k-late-$task" --length 8k --samples 10 --tasks "$task" --policies "$LATE"
done
run 10 sweep --length 8k --samples 10 --tasks "${QUICK// /,}" --policies "$SWEEP"
run 10 fidelity --length 4k --samples 0 --tasks all --policies "plain,dash@0.5,dash@0.5/d0.8,random@0.5/d0.8" --fidelity 56
wait
python3 scripts/merge_results.py "$out/results.jsonl" ${done_cells:+"$done_cells"} "$out"/parts/*/results.jsonl

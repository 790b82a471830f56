#!/usr/bin/env bash
# SmolLM2-135M's accuracy grid of EVAL.md on one CUDA GPU, as parallel `dash-prefill eval`
# processes (Gemma-3-270M's grid: scripts/eval_gpu_gemma.sh).
#
# Usage: scripts/eval_gpu.sh OUT_DIR
# Each process writes OUT_DIR/parts/<name>/results.jsonl (+ a log); scripts/merge_results.py
# then joins them. The small models leave the GPU idle between kernel launches, so
# ten processes share it. Float32 weights, as on CPU. Needs the registry packages installed.
set -euo pipefail
out=${1:?usage: scripts/eval_gpu.sh OUT_DIR}
mkdir -p "$out/parts"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

A=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue
B=niah_multiquery,vt,cwe,fwe,passkey,qa_1,qa_2
QUICK=niah_single_1,vt,fwe
MAIN="plain,dash@0.25,dash@0.5,dash@0.75,random@0.25,random@0.5,random@0.75,dash-rel@0.5,attention@0.5"
LATE="dash@0.25/d0.8,dash@0.5/d0.8,dash@0.75/d0.8,random@0.5/d0.8"
SWEEP="dash@0.5/d0.25,dash@0.5/d0.6,random@0.5/d0.25,random@0.5/d0.6"
FIDELITY="plain,dash@0.5,dash@0.75,random@0.5,dash-rel@0.5,attention@0.5,dash@0.5/d0.8,random@0.5/d0.8"

run() {  # run NAME ARGS... in the background
  local name=$1; shift
  python3 -m dash_prefill.cli eval --device cuda --dtype float32 --out "$out/parts/$name" "$@" \
    >"$out/parts/$name.log" 2>&1 &
}
convert() {  # convert a registry model once, before parallel processes read it
  python3 -c "from dash_prefill.loading import load_model; load_model('$1', device='cpu')"
}

convert smollm2-135m
s="--model smollm2-135m --length 4k"
run s-main-a $s --samples 10 --tasks $A --policies $MAIN
run s-main-b $s --samples 10 --tasks $B --policies $MAIN
run s-late-a $s --samples 10 --tasks $A --policies $LATE
run s-late-b $s --samples 10 --tasks $B --policies $LATE
run s-sweep $s --samples 10 --tasks $QUICK --policies $SWEEP
run s-fidelity $s --samples 0 --tasks all --policies $FIDELITY --fidelity 56

wait
echo "all eval processes finished"

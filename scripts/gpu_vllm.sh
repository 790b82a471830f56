#!/usr/bin/env bash
# DASH in vLLM 0.26.0 on the GPU machine, after the two transfers of ../shared/tools/vllm-gpu/
# (the second one's go.sh leaves /tmp/vb/env.sh). Usage: bash scripts/gpu_vllm.sh STEP... (OUT=dir)
#   check   tiny random Llama/Qwen2: kept sets and greedy tokens against the HF path, bf16 (scripts/vllm_check.py)
#   ttft    Llama-3.1-8B shape, random weights: one prompt at 8K/32K/128K, plain vs DASH settings
#   load    Llama-3.1-8B shape: 16 prompts of 32K at once and a stream of 64 short ones
set -uo pipefail
cd "$(dirname "$0")/.."
source /tmp/vb/env.sh
out=${OUT:-/tmp/out}; mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PYTHONPATH"
# vLLM finds the plugin through its entry point in every process it starts
meta=/tmp/site/dash_prefill-0.1.0.dist-info; mkdir -p "$meta"
printf 'Metadata-Version: 2.1\nName: dash-prefill\nVersion: 0.1.0\n' > "$meta/METADATA"
printf '[vllm.general_plugins]\ndash_prefill = dash_prefill.vllm:register\n' > "$meta/entry_points.txt"
TWO_GATES="attention@0.3/s9/p47o16+0.75/s16"   # EVAL.md's Qwen two-gate setting (s8, s14 of 28) on 32 layers
for step in "$@"; do
  case $step in
    check)
      timeout 300 python3 scripts/vllm_check.py --device cuda --dtypes ${CHECK_DTYPES:-bfloat16} --out "$out/check" > "$out/check.log" 2>&1
      grep "^|" "$out/check.log" ;;
    ttft)
      timeout ${TTFT_LIMIT:-330} python3 scripts/bench_vllm.py ttft --arch llama-3.1-8b --lengths ${LENGTHS:-8192,32768,131000} \
        --settings plain,dash@0.5/d0.4,$TWO_GATES --repeats 3 --out "$out/ttft" > "$out/ttft.log" 2>&1
      grep "^ROW" "$out/ttft.log" | cut -c 1-220; grep "^|" "$out/ttft.log" ;;
    load)
      timeout ${LOAD_LIMIT:-400} python3 scripts/bench_vllm.py load --arch llama-3.1-8b --long 16 --long-tokens 32768 \
        --short 64 --short-tokens 512 --short-rate 4 --new-tokens 64 --settings ${LOAD_SETTINGS:-dash@0.5/d0.4,plain,vllm} \
        --out "$out/load" > "$out/load.log" 2>&1
      grep "^|" "$out/load.log" ;;
  esac
  grep -hE "Error|error:" "$out/$step.log" | grep -v -E "Tokenizer not available|WARNING" | tail -5
done
nvidia-smi --query-gpu=name --format=csv,noheader

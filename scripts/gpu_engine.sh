#!/usr/bin/env bash
# The engine checks of issue 10 on one CUDA GPU: the CUDA test suite (DASH_TEST_DEVICE=cuda)
# and `dash-prefill bench` on the Llama-3.1-8B shape (random weights) for the policies of EVAL.md.
# Usage: scripts/gpu_engine.sh OUT   (writes OUT/tests.log, OUT/bench/bench.json, OUT/bench.log)
set -uo pipefail
out=${1:?usage: scripts/gpu_engine.sh OUT}
mkdir -p "$out"
export PYTHONPATH="/tmp/site:src" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
DASH_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py \
  tests/test_generation.py tests/test_cuda_syncs.py tests/test_kv_accounting.py 2>&1 | tail -15 | tee "$out/tests.log"
timeout 330 python3 -m dash_prefill.cli bench --device cuda --arch llama-3.1-8b --lengths 8k,32k,128k \
  --settings d0.4:0.5,d0.25:0.75 --policies dash,attention/p15,attention/p63,contribution/p15 \
  --warmup 1 --repeats 3 --sync-check --out "$out/bench" 2>&1 | tee "$out/bench.log" | tail -40

#!/usr/bin/env bash
# The accuracy session of EVAL.md on one CUDA GPU: calibration of the three registry models
# (alone on the GPU first), then the grids of the new policies and of the calibrated settings
# (parallel `dash-prefill eval` processes, resuming from the committed results). Resumable: run
# it again to continue.
#
# Usage: scripts/gpu_accuracy.sh BUNDLE WORK SECONDS
#   BUNDLE  folder with wheels/ (the registry packages, gguf, wonderwords, the data package)
#           and tok/<cache name>/ (tokenizer files converted by transformers 5.24: 5.17
#           converts Gemma-3's wrongly and load_model refuses it)
#   WORK    output folder (parts/, calibration/); kept between runs
#   SECONDS every evaluation job stops after this long (results are appended per sample)
# Labels without /s start at 0.4, as in EVAL.md (eval alone would use the recommended start layer).
# Then: python scripts/merge_results.py results/eval/<dir>/results.jsonl WORK/parts/<model>-*/results.jsonl
set -uo pipefail
bundle=${1:?usage: scripts/gpu_accuracy.sh BUNDLE WORK SECONDS}
work=${2:?}; limit=${3:?}
mkdir -p "$work/parts" "$work/calibration"
export PYTHONPATH="/tmp/site:src" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
models="smollm2-135m gemma3-270m qwen2.5-coder-1.5b"
bash scripts/gpu_setup.sh "$bundle" $models

# Calibration (rows kept in <model>.rows.json even when no setting meets the budget): a small grid, 8 built-in prompts, the three models at once (nothing else on the GPU).
CAL_POLICIES="dash,dash/p63,attention/p15,attention/p63,contribution/p63"
calibrate() {  # calibrate MODEL DTYPE LENGTH
  local profile="$work/calibration/$1.json"
  [ -f "${profile%.json}.rows.json" ] || timeout "${CAL_SECONDS:-240}" python3 -m dash_prefill.cli calibrate --model "$1" \
    --device cuda --dtype "$2" --length "$3" --count 8 --policies "$CAL_POLICIES" \
    --starts d0.25,d0.4,d0.6 --ratios 0.5,0.75,0.9 --out "$profile" >"$work/calibration/$1.log" 2>&1
}
calibrate qwen2.5-coder-1.5b bfloat16 4096 &
calibrate smollm2-135m float32 4096 &
calibrate gemma3-270m float32 8192 &
wait
chosen() {  # the choices under four KL budgets, from the same measured rows
  [ -f "$work/calibration/$1.rows.json" ] || return
  python3 - "$work/calibration/$1.rows.json" <<'PY'
import json, sys
from dash_prefill.calibrate import Budget, BudgetNotMetError, choose
rows = json.load(open(sys.argv[1]))
chosen = []
for kl in (0.02, 0.05, 0.1, 0.2, 0.5):
    try:
        chosen.append(choose(rows, Budget(max_kl=kl))["label"])
    except BudgetNotMetError:
        pass
print("".join("," + label for label in dict.fromkeys(chosen)))
PY
}

eval_job() {  # eval_job NAME MODEL DTYPE DONE ARGS...
  local name=$1 model=$2 dtype=$3 done_cells=$4; shift 4
  mkdir -p "$work/parts/$name"
  [ -n "$done_cells" ] && [ ! -f "$work/parts/$name/results.jsonl" ] && cp "$done_cells" "$work/parts/$name/results.jsonl"
  timeout "$limit" python3 -m dash_prefill.cli eval --device cuda --dtype "$dtype" --model "$model" --start-layer d0.4 \
    --out "$work/parts/$name" "$@" >"$work/parts/$name.log" 2>&1
}
GROUPS_="niah_single_1,niah_single_2,niah_multikey_1 niah_single_3,niah_multikey_2 niah_multikey_3,niah_multivalue
niah_multiquery,vt cwe,fwe passkey,qa_1,qa_2"
WIDE="attention@0.5/p31,attention@0.5/p63,attention@0.75/p63,contribution@0.5/p63,dash@0.5/p63"
QWEN="plain,dash@0.5,random@0.5,attention@0.5,attention@0.5/p15,attention@0.75/p15,contribution@0.5/p15,$WIDE,attention@0.75/p31,attention@0.9/p63$(chosen qwen2.5-coder-1.5b)"
SMALL="plain,dash@0.5,attention@0.5,attention@0.5/p15,$WIDE"
SMOL="$SMALL$(chosen smollm2-135m)"; GEMMA="$SMALL$(chosen gemma3-270m)"
echo "qwen: $QWEN"; echo "smollm2: $SMOL"; echo "gemma: $GEMMA"
QDONE=results/eval/qwen2.5-coder-1.5b/results.jsonl
i=0
for group in $GROUPS_; do
  i=$((i + 1))
  eval_job "qwen-$i" qwen2.5-coder-1.5b bfloat16 $QDONE --length 4k --samples 5 --tasks "$group" --policies "$QWEN" &
  eval_job "smollm2-$i" smollm2-135m float32 results/eval/smollm2-4k/results.jsonl --length 4k \
    --samples 10 --tasks "$group" --policies "$SMOL" &
  eval_job "gemma-$i" gemma3-270m float32 results/eval/gemma3-270m/results.jsonl --length 8k \
    --samples 10 --tasks "$group" --policies "$GEMMA" &
done
eval_job qwen-8k qwen2.5-coder-1.5b bfloat16 $QDONE --length 8k --samples 5 --tasks niah_single_1,vt,fwe \
  --policies "plain,dash@0.5,attention@0.5/p15,attention@0.5/p63,attention@0.75/p63,dash@0.5/p63$(chosen qwen2.5-coder-1.5b)" &
wait
echo "jobs finished or stopped after $limit s"

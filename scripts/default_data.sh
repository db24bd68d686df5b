#!/usr/bin/env bash
# Build the default corpus, tokenizer and shards into data/default (each step skipped when its output exists).
# Used by the quickstart and the benchmarks. Needs an installed venv (LARGELM_VENV, default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${LARGELM_VENV:-.venv}/bin
DATA=data/default
[ -f $DATA/corpus/corpus.jsonl ] || "$BIN/largelm-build-corpus" --out $DATA/corpus
[ -f $DATA/tokenizer/spm.model ] || "$BIN/largelm-train-tokenizer" --input $DATA/corpus/corpus.jsonl \
    --out $DATA/tokenizer --vocab-size 4096
[ -f $DATA/shards/train/manifest.json ] || "$BIN/largelm-prepare-data" --input $DATA/corpus/corpus.jsonl \
    --tokenizer $DATA/tokenizer/spm.model --seq-length 128 --out $DATA/shards

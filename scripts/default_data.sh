#!/usr/bin/env bash
# Build the default corpus, tokenizer, shards and held-out lm-eval tasks into data/default (each step skipped when its output exists).
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
[ -f $DATA/eval_tasks/tasks.json ] || "$BIN/largelm-eval" --make-tasks --corpus $DATA/corpus/corpus.jsonl \
    --task-dir $DATA/eval_tasks      # same held-out split as the shards' valid/ (--valid-fraction 0.01)

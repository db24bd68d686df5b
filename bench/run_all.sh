#!/usr/bin/env bash
# Run every benchmark and write bench/results/summary.md (+ one .md/.json/.png per benchmark).
# Needs the install (bash scripts/install.sh); builds the default data set first if missing, as the quickstart does.
# About 6 minutes on an idle 2-core CPU (12 with other jobs on the cores). Run it on an otherwise idle machine:
# absolute timings (not the side-by-side ratios) move with load, and every result file records the load average.
#   LARGELM_VENV   venv to use (default .venv)
#   BENCH_ARGS     extra arguments for every benchmark script, e.g. BENCH_ARGS=--quick for a smoke run
#   LARGELM_BENCH_EMULATED_BF16  bf16 cases where the CPU has no native bf16 (AVX512_BF16/AMX): probe (default:
#                  run them only if the model's products are <= 3x slower than fp32, else skip with the reason), run, skip
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LARGELM_VENV:-.venv}
PY="$VENV/bin/python"
BIN="$VENV/bin"
[ -x "$PY" ] || { echo "error: $PY not found: run bash scripts/install.sh first (or set LARGELM_VENV)" >&2; exit 2; }
"$PY" -c "import matplotlib, transformers" 2>/dev/null || {
  echo "error: the benchmarks need the dev extras (matplotlib, transformers): $BIN/pip install -e '.[dev]'" >&2; exit 2; }
export DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
bash scripts/default_data.sh
LOGS=bench/results/logs  # full output of each script (not committed)
mkdir -p $LOGS
[ -f $LOGS/.gitignore ] || echo "*" > $LOGS/.gitignore
start=$(date +%s)
for bench in p1_overhead p2_vs_hf p3_mfu p4_data p4_remote p5_memory scaling; do
  t0=$(date +%s)
  echo "=== $bench" >&2
  # shellcheck disable=SC2086
  if ! "$PY" bench/$bench.py ${BENCH_ARGS:-} 2>&1 | tee $LOGS/$bench.log | { grep --line-buffered -E "^\[(P[1-5]|scaling)|^wrote" || true; }
  then
    tail -n 40 $LOGS/$bench.log >&2
    echo "error: $bench failed (full output: $LOGS/$bench.log)" >&2
    exit 1
  fi
  echo "=== $bench done in $(( $(date +%s) - t0 ))s" >&2
done
"$PY" bench/summary.py
echo "all benchmarks done in $(( $(date +%s) - start ))s: ${LARGELM_BENCH_RESULTS:-bench/results}/summary.md" >&2

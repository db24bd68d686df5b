#!/usr/bin/env bash
# Install (if needed) and run the whole test suite, slow multi-rank tests included; then run the numerics tests
# (pytest -m numerics: parity and rounding-sensitive tolerances) a second time under AVX2 emulation
# (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2), so an AVX-512 machine also checks them against the rounding
# and bf16 kernels of AVX2-only CPUs (docs/design.md, "What the AVX2 emulation changes"). On a CPU whose capability
# is already AVX2 or below the first pass ran there, and the second is skipped with the reason printed.
# Extra args go to pytest in both passes (the second adds -m numerics last): `scripts/test.sh tests/test_x.py`
# runs that file, then its numerics tests emulated. Exits non-zero if either pass fails; pytest's exit code 5
# (no tests selected) counts as success. The 25 slowest tests are listed (--durations) to keep the suite within budget.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DS_ACCELERATOR=cpu
PY="${LARGELM_VENV:-.venv}/bin/python"

run_pytest() {  # pytest's exit status, with 5 (nothing collected) mapped to 0
    local rc=0
    "$PY" -m pytest -q --timeout=900 --durations=25 "$@" || rc=$?
    if [ "$rc" -eq 5 ]; then rc=0; fi
    return "$rc"
}

first=0
run_pytest "$@" || first=$?  # no path given: pyproject's testpaths (tests/)

second=0
capability=$("$PY" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')
if [ "$capability" = "AVX512" ]; then
    echo "=== second pass: pytest -m numerics under AVX2 emulation (ATEN_CPU_CAPABILITY=avx2" \
         "ONEDNN_MAX_CPU_ISA=AVX2; native capability $capability) ==="
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 run_pytest "$@" -m numerics || second=$?
else
    echo "=== second pass skipped: torch's CPU capability is $capability, not AVX512 - the first pass already" \
         "ran on AVX2-or-below kernels, which the emulation would only imitate ==="
fi

if [ "$first" -ne 0 ] || [ "$second" -ne 0 ]; then
    echo "=== tests failed: first pass exit $first, AVX2-emulation pass exit $second ===" >&2
    exit $(( first != 0 ? first : second ))
fi

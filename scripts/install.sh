#!/usr/bin/env bash
# Create .venv and install largelm with its dev extras. Idempotent.
#   TORCH_SPEC    torch requirement (default torch==2.13.0: the CPU build cached on the dev/CI machines;
#                 on a GPU cluster use the CUDA build you want, e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index)
#   LARGELM_VENV  venv location (default .venv)
#   LARGELM_GPTQ_RUNTIME=0  skip the GPTQ runtime (scripts/gptq-runtime.txt; tests/test_quant_hf.py's runtime
#                 checks then skip, except under CI=true, where they fail)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LARGELM_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# torch first and pinned: an unpinned torch would pull multi-GB CUDA wheels on a CPU machine.
"$VENV/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# The GPTQ runtime (pins and why it goes in without dependencies: scripts/gptq-runtime.txt), installed into a
# side directory once per pin set and put on the venv's path by a .pth file.
if [ "${LARGELM_GPTQ_RUNTIME:-1}" != 0 ]; then
  GPTQ_DIR="$(cd "$VENV" && pwd)/gptq-runtime"
  PINS=$(grep -v '^#' scripts/gptq-runtime.txt)
  STAMP="$GPTQ_DIR/.pins-$(echo "$PINS" | sha256sum | cut -c1-16)"
  if [ ! -f "$STAMP" ]; then
    rm -rf "$GPTQ_DIR" "$GPTQ_DIR.partial"
    # shellcheck disable=SC2086  # one argument per pin
    BUILD_CUDA_EXT=0 "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation \
      --target "$GPTQ_DIR.partial" $PINS 2>&1 | grep -v "^WARNING: Location" || true
    [ -d "$GPTQ_DIR.partial/gptqmodel" ] || { echo "install.sh: the GPTQ runtime did not install" \
      "(scripts/gptq-runtime.txt; LARGELM_GPTQ_RUNTIME=0 skips it)" >&2; exit 1; }
    touch "$GPTQ_DIR.partial/$(basename "$STAMP")"
    mv "$GPTQ_DIR.partial" "$GPTQ_DIR"
  fi
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$GPTQ_DIR" > "$SITE/largelm-gptq-runtime.pth"
fi
# Without CUDA, DeepSpeed JIT-compiles its shared-memory comm op at the first init_distributed (~30 s, cached in
# ~/.cache/torch_extensions). Build it here, once, instead of inside the first training run.
DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} "$VENV/bin/python" - <<'PY' 2>&1 | grep -v "WARNING\|warn" || true
from largelm.parallel.deepspeed_compat.ops import prepare_cpu_comm_op
prepare_cpu_comm_op()  # the build directory the ranks use (keyed by the build configuration), under the same lock
PY
"$VENV/bin/python" -c "import torch, deepspeed, megatron.core, webdataset, sentencepiece, largelm; print('largelm installed: torch', torch.__version__, '| deepspeed', deepspeed.__version__)"

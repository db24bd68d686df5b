#!/usr/bin/env bash
# Install (if needed) and run the whole test suite, slow multi-rank tests included. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export DS_ACCELERATOR=cpu
exec "${LARGELM_VENV:-.venv}/bin/python" -m pytest tests -q --timeout=900 "$@"

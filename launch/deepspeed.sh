#!/usr/bin/env bash
# Launch with the deepspeed launcher after validating the config for the layout.
#   launch/deepspeed.sh CONFIG.yaml NPROC_PER_NODE [HOSTFILE] [-- overrides...]
# Multi-node (pdsh/ssh): give a hostfile ("host slots=N" per line, see launch/hostfile.example).
set -euo pipefail
CONFIG=$1; NPROC=$2; shift 2
HOSTFILE_ARGS=()
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
  NODES=$(grep -cv '^\s*\(#\|$\)' "$1")
  HOSTFILE_ARGS=(--hostfile "$1" --num-nodes "$NODES"); shift
fi
exec largelm-launch --config "$CONFIG" --nproc "$NPROC" "${HOSTFILE_ARGS[@]}" "$@"

#!/usr/bin/env bash
# Launch with torchrun. Single node:  launch/torchrun.sh CONFIG.yaml NPROC [-- overrides...]
# Multi-node: run on every node with NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) set.
set -euo pipefail
CONFIG=$1; NPROC=$2; shift 2
ARGS=(--launcher torchrun --nproc "$NPROC")
if [ "${NNODES:-1}" -gt 1 ]; then
  ARGS+=(--num-nodes "$NNODES" --node-rank "${NODE_RANK:?}" --master-addr "${MASTER_ADDR:?}" --master-port "${MASTER_PORT:-29500}")
fi
exec largelm-launch --config "$CONFIG" "${ARGS[@]}" "$@"

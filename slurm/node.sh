#!/bin/bash
# Runs the training on one node of a Slurm job. Started by the generated sbatch scripts (slurm/job.sbatch.in):
#   launcher deepspeed|torchrun: by srun, once per node; it runs largelm-launch --no-ssh/--node-rank for this node
#   launcher srun:               by srun, once per rank; it execs the trainer with RANK=SLURM_PROCID etc.
#   launcher pdsh:               by the batch shell; the deepspeed launcher reaches the other nodes over pdsh/ssh
# Reads LARGELM_JOB_* and MASTER_ADDR/PORT from the batch script.
#
# Signals: USR1 and TERM are ignored by the launcher processes (the ignore is inherited through exec/fork) and
# handled by every training rank (it installs its own handler: finish the step, checkpoint, exit 42). So a signal
# Slurm sends to every process of the step never kills a launcher half-way, and the exit code of the ranks comes
# back through the launcher. This shell only records the signal, re-sends USR1 every 15 s while the ranks live
# (a rank still importing when the first one came had it ignored), and exits with the launcher's code -- or 42 if
# the launcher reported a plain failure after a stop signal but a new checkpoint was written (torchrun exits 1).
set -uo pipefail

CONFIG=$LARGELM_JOB_CONFIG
LAUNCHER=$LARGELM_JOB_LAUNCHER
NPROC=$LARGELM_JOB_NPROC_PER_NODE
NNODES=$LARGELM_JOB_NNODES
HOSTFILE=$LARGELM_JOB_HOSTFILE
eval "OVERRIDES=($LARGELM_JOB_OVERRIDES)"
CKPT_DIR=
for item in "${OVERRIDES[@]}"; do
  case $item in checkpoint.dir=*) CKPT_DIR=${item#checkpoint.dir=} ;; esac
done
NODE_RANK=${SLURM_NODEID:-0}
WHO="node $NODE_RANK ($(hostname -s))"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  :  # CUDA node: NCCL, nothing to set
else
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}  # same script on a CPU node: DeepSpeed's CPU accelerator, gloo
fi

case $LAUNCHER in
  deepspeed)
    CMD=(largelm-launch --config "$CONFIG" --nproc "$NPROC" --num-nodes "$NNODES" --hostfile "$HOSTFILE"
         --no-ssh --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
         -- "${OVERRIDES[@]}") ;;
  torchrun)
    CMD=(largelm-launch --launcher torchrun --config "$CONFIG" --nproc "$NPROC" --num-nodes "$NNODES"
         --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -- "${OVERRIDES[@]}") ;;
  srun)
    export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID LOCAL_WORLD_SIZE=$NPROC
    WHO="rank $RANK ($(hostname -s))"
    if [ "${DS_ACCELERATOR:-}" = cpu ]; then
      export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    fi
    CMD=(python -m largelm.train.main --config "$CONFIG" "${OVERRIDES[@]}") ;;
  pdsh)  # (one node: no hostfile, else the deepspeed runner insists on ssh to this very node)
    HOSTS=(--hostfile "$HOSTFILE" --num-nodes "$NNODES")
    [ "$NNODES" -eq 1 ] && HOSTS=()
    CMD=(largelm-launch --config "$CONFIG" --nproc "$NPROC" "${HOSTS[@]}"
         --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -- "${OVERRIDES[@]}") ;;
  *) echo "node.sh: unknown launcher '$LAUNCHER'" >&2; exit 2 ;;
esac

STOP=""
MARKER=$(mktemp "${TMPDIR:-/tmp}/largelm-stop.XXXXXX")
on_signal() {
  if [ -z "$STOP" ]; then
    STOP=$1
    touch "$MARKER"
    echo "node.sh: $WHO got SIG$1 at $(date -Is); the ranks checkpoint after this step" >&2
  fi
  if [ "$LAUNCHER" = pdsh ]; then forward_pdsh "$1"; else signal_ranks "$1"; fi
}
descendants() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}
signal_ranks() {  # launchers ignore it; ranks (and their data workers) handle it; harmless if repeated
  local pids
  pids=$(descendants "$PID")
  [ -n "$pids" ] && kill -s "$1" $pids 2>/dev/null
  return 0
}
forward_pdsh() {  # ranks on the other nodes were started over ssh, outside Slurm: signal them by command line
  signal_ranks "$1"
  if [ "$NNODES" -gt 1 ]; then
    srun --overlap --nodes="$NNODES" --ntasks-per-node=1 \
         pkill "-$1" -f -- "largelm[.]train[.]main .*--config $(printf '%s' "$CONFIG" | sed 's/[][\.*^$+?(){}|]/\\&/g')" \
         2>/dev/null || true
  fi
}
trap '' USR1 TERM  # inherited by the launcher and the ranks as "ignore"; each rank installs its own handler
"${CMD[@]}" &
PID=$!
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
LAST_RESEND=$SECONDS
RC=""
while [ -z "$RC" ]; do
  if [ "$STOP" = USR1 ]; then
    sleep 1  # poll, so USR1 can be re-sent
    if [ $((SECONDS - LAST_RESEND)) -ge 15 ]; then
      LAST_RESEND=$SECONDS
      signal_ranks USR1
    fi
    kill -0 "$PID" 2>/dev/null && continue
  fi
  wait "$PID"
  status=$?
  kill -0 "$PID" 2>/dev/null && continue  # wait was interrupted by a trapped signal
  if [ "$status" -gt 128 ]; then  # interrupted just as it ended? then this wait reports the real status
    wait "$PID" 2>/dev/null
    again=$?
    [ "$again" -ne 127 ] && status=$again
  fi
  RC=$status
done

if [ -n "$STOP" ] && [ "$RC" -ne 0 ] && [ "$RC" -ne 42 ] && [ -n "$CKPT_DIR" ] && [ "$CKPT_DIR/latest" -nt "$MARKER" ]; then
  echo "node.sh: $WHO: launcher exited $RC after SIG$STOP and a checkpoint was written since: exit 42" >&2
  RC=42
fi
rm -f "$MARKER"
exit "$RC"

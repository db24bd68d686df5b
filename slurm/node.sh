#!/bin/bash
# Runs the training on one node of a Slurm job. Started by the generated sbatch scripts (slurm/job.sbatch.in):
#   launcher deepspeed|torchrun: by srun, once per node; it runs largelm-launch --no-ssh/--node-rank for this node
#   launcher srun:               by srun, once per rank; it runs the trainer with RANK=SLURM_PROCID etc.
#   launcher pdsh:               by the batch shell; the deepspeed launcher reaches the other nodes over pdsh/ssh
# Reads LARGELM_JOB_* and MASTER_ADDR/PORT from the batch script.
#   node.sh --signal SIG   (used by the pdsh launcher, through srun on every node) signals this node's ranks.
#
# Stop requests reach the training ranks, and only them:
#  * The batch shell appends the signal's name to $LARGELM_JOB_STOP_FILE (in the shared run directory); this script
#    polls it every second and sends that signal to the rank processes of its node: the launcher's descendants that
#    run largelm.train.main (not their forked data workers, not compilers or other helpers they run).
#  * A signal Slurm sends to the whole job step (scancel --signal=USR1 without --batch) reaches every process of
#    the step. The launchers survive it: they are started with USR1 and TERM ignored, which is inherited through
#    fork/exec (each rank installs its own handler). This script traps it and forwards it the same way.
# A rank finishes its step, all ranks checkpoint, they exit 42. A rank still importing when the signal came has it
# ignored: USR1 is re-sent every 15 s until the ranks exit. The exit code is the launcher's, or 42 if the launcher
# reported a plain failure after a stop request but a new checkpoint was written since (torchrun reports 1).
set -uo pipefail

CONFIG=$LARGELM_JOB_CONFIG
LAUNCHER=$LARGELM_JOB_LAUNCHER
NNODES=$LARGELM_JOB_NNODES

is_rank() {  # pid runs the trainer (a deepspeed/torchrun/srun rank, or torchrun itself, which ignores USR1)
  local args
  args=$(tr '\0' ' ' 2>/dev/null < "/proc/$1/cmdline") || return 1
  case $args in *"-m largelm.train.main "*"--config $CONFIG "*) return 0 ;; esac
  return 1
}
forked_copy() {  # pid is a fork of its parent (same command line): a data-loader worker of a rank
  local ppid
  ppid=$(awk '{print $4}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$ppid" ] && cmp -s "/proc/$1/cmdline" "/proc/$ppid/cmdline"
}
signal_ranks_among() {  # signal pids ... : the ranks among these pids
  local sig=$1 pid
  shift
  for pid in "$@"; do
    if is_rank "$pid" && ! forked_copy "$pid"; then
      kill -s "$sig" "$pid" 2>/dev/null
    fi
  done
  return 0
}

this_job() {  # pid carries this job's LARGELM_JOB_TAG (set by the batch script, forwarded to every rank)
  tr '\0' '\n' 2>/dev/null < "/proc/$1/environ" | grep -qx "LARGELM_JOB_TAG=${LARGELM_JOB_TAG:?}"
}

if [ "${1:-}" = --signal ]; then  # pdsh launcher: this node's ranks of this job (not another job's, same config)
  for pid in $(pgrep -f -- "largelm[.]train[.]main"); do
    this_job "$pid" && signal_ranks_among "$2" "$pid"
  done
  exit 0
fi

NPROC=$LARGELM_JOB_NPROC_PER_NODE
HOSTFILE=$LARGELM_JOB_HOSTFILE
STOP_FILE=$LARGELM_JOB_STOP_FILE
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

descendants() {
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}
signal_ranks() {
  # shellcheck disable=SC2046
  signal_ranks_among "$1" "$PID" $(descendants "$PID")
  if [ "$LAUNCHER" = pdsh ] && [ "$NNODES" -gt 1 ]; then  # ranks on the other nodes were started over ssh
    srun --overlap --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 bash "$0" --signal "$1" || true
  fi
}
STOP=""
MARKER=$(mktemp "${TMPDIR:-/tmp}/largelm-stop.XXXXXX")
on_signal() {
  if [ -z "$STOP" ]; then
    STOP=$1
    touch "$MARKER"
    echo "node.sh: $WHO: stop requested (SIG$1) at $(date -Is); the ranks checkpoint after this step" >&2
  fi
  signal_ranks "$1"
}

trap '' USR1 TERM  # inherited by the launcher and the ranks as "ignore"; each rank installs its own handler
"${CMD[@]}" &
PID=$!
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
LAST_RESEND=$SECONDS
SEEN_LINES=0
RC=""
while [ -z "$RC" ]; do
  sleep 1
  if [ -s "$STOP_FILE" ]; then  # the batch shell got a signal: USR1 or TERM, one line each
    LINES=$(wc -l < "$STOP_FILE")
    if [ "$LINES" -gt "$SEEN_LINES" ]; then
      SEEN_LINES=$LINES
      on_signal "$(tail -n 1 "$STOP_FILE" | cut -d' ' -f1)"
    fi
  fi
  if [ "$STOP" = USR1 ] && [ $((SECONDS - LAST_RESEND)) -ge 15 ]; then
    LAST_RESEND=$SECONDS
    signal_ranks USR1
  fi
  if ! kill -0 "$PID" 2>/dev/null; then
    wait "$PID"
    RC=$?
  fi
done

if [ -n "$STOP" ] && [ "$RC" -ne 0 ] && [ "$RC" -ne 42 ] && [ -n "$CKPT_DIR" ] && [ "$CKPT_DIR/latest" -nt "$MARKER" ]; then
  echo "node.sh: $WHO: launcher exited $RC after SIG$STOP and a checkpoint was written since: exit 42" >&2
  RC=42
fi
rm -f "$MARKER"
# What this task ended with, and when, for the batch script: once one task fails, srun ends the others and neither
# their codes nor srun's say why the step ended; the first task to fail does (slurm/job.sbatch.in, step_outcome).
if [ -n "${LARGELM_JOB_RESULTS:-}" ]; then
  echo "$RC $(date +%s.%N)" > "$LARGELM_JOB_RESULTS/task-${SLURM_PROCID:-$NODE_RANK}"
fi
exit "$RC"

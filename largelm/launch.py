"""Start a training run with the deepspeed launcher or torchrun, after validating the config for the layout.

    largelm-launch --config configs/gpt-tiny.yaml --nproc 2                      # deepspeed, this machine
    largelm-launch --config c.yaml --hostfile launch/hostfile --num-nodes 2 --nproc 8
    largelm-launch --config c.yaml --launcher torchrun --nproc 2 -- train.steps=50

On a machine without CUDA it sets DS_ACCELERATOR=cpu and gives each rank an equal share of the cores
(OMP_NUM_THREADS); with CUDA nothing changes and NCCL is used. The command is printed before it runs.

The deepspeed launcher runs as ``python -m largelm.ds_launcher`` (DeepSpeed's runner and launch code in one process,
which polls the ranks every 0.1 s and exits without Python's teardown; see that module), and run from the command
line this process becomes the launcher (exec) instead of waiting for it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Optional

import torch

from largelm.checkpoint.lock import CheckpointLocked, check_unlocked
from largelm.cli import positive_int
from largelm.config import ConfigError, load_config
from largelm.launch_plan import LaunchError, plan_launch
from largelm.parallel.network import choose_socket_interface
from largelm.train.preflight import preflight

ENTRY_MODULE = "largelm.train.main"
DEEPSPEED_MODULE = "largelm.ds_launcher"  # deepspeed.launcher.runner's command line, started faster


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    p.add_argument("--nproc", type=positive_int, default=1, help="ranks per node (GPUs per node; CPU processes here)")
    p.add_argument("--num-nodes", type=positive_int, default=1)
    p.add_argument("--hostfile", help="deepspeed hostfile ('host slots=N' per line)")
    p.add_argument("--include", help="deepspeed --include, e.g. 'node1:0,1@node2'")
    p.add_argument("--exclude", help="deepspeed --exclude")
    p.add_argument("--master-addr", default=None)
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--node-rank", type=int, default=None,
                   help="this node's rank in a per-node launch (--no-ssh, or torchrun multi-node): 0 .. num-nodes - 1")
    p.add_argument("--no-ssh", action="store_true",
                   help="deepspeed: start only this node's ranks (run once per node, e.g. via srun)")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=20")
    return p


# glibc malloc serves allocations above 32 MiB with fresh mmap()s and returns them on free, so every step's large
# temporaries (DeepSpeed's flat fp32 gradient partitions and buffers, logits) are page-faulted in anew: 4x the cost
# of the arithmetic for a 100 MB tensor. Keeping freed memory in the heap for reuse (what jemalloc/tcmalloc do, as
# PyTorch's CPU tuning guide recommends) made a ~25M-parameter bf16 step ~10% faster (bench/, P1/P2).
CPU_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def cpu_environment(env: dict, nproc: int) -> dict:
    """No CUDA: DeepSpeed's CPU accelerator, gloo, threads split evenly between the ranks, and glibc malloc set to
    reuse freed memory instead of unmapping it (``CPU_MALLOC_ENV``). Values already in ``env`` win."""
    env = dict(env)
    env.setdefault("DS_ACCELERATOR", "cpu")
    # the cores this process may run on (a Slurm or cgroup CPU allocation), not every core of the machine
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    for key, value in CPU_MALLOC_ENV.items():
        env.setdefault(key, value)
    return env


def build_command(args: argparse.Namespace) -> list[str]:
    script = ["--config", args.config, *args.overrides]
    if args.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={args.num_nodes}",
               f"--nproc-per-node={args.nproc}"]
        if args.num_nodes > 1:  # plan_launch also requires an in-range --node-rank here
            if not args.master_addr:
                raise SystemExit("error: --master-addr is required for multi-node torchrun")
            cmd += [f"--node-rank={args.node_rank or 0}", f"--master-addr={args.master_addr}",
                    f"--master-port={args.master_port or 29500}"]
        else:
            cmd += ["--standalone"]
        return cmd + ["-m", ENTRY_MODULE, *script]
    cmd = [sys.executable, "-m", DEEPSPEED_MODULE, f"--num_gpus={args.nproc}"]
    if args.hostfile:
        cmd += [f"--hostfile={args.hostfile}", f"--num_nodes={args.num_nodes}"]
    elif args.num_nodes > 1 and not args.no_ssh:
        raise SystemExit("error: --num-nodes > 1 needs --hostfile (or --no-ssh with one launch per node)")
    if args.no_ssh:
        cmd += ["--no_ssh", f"--node_rank={args.node_rank or 0}"]
        cmd += [] if args.hostfile else [f"--num_nodes={args.num_nodes}"]
    for flag in ("include", "exclude", "master_addr", "master_port"):
        value = getattr(args, flag)
        if value is not None:
            cmd.append(f"--{flag}={value}")
    return cmd + ["--module", ENTRY_MODULE, *script]


def main(argv=None, *, replace_process: Optional[bool] = None) -> int:
    """Validate, then run the launcher. As the program (``argv`` None: ``largelm-launch``, ``python -m
    largelm.launch``; or ``replace_process``) this process is replaced by the launcher, so that it neither holds
    torch in memory for the whole run nor spends seconds tearing it down at the end; exit code and signals are the
    launcher's. Called with ``argv`` (from Python) it runs the launcher as a child and returns its exit code."""
    if replace_process is None:
        replace_process = argv is None
    args = build_parser().parse_args(argv)
    world_size = args.nproc * args.num_nodes
    try:  # validate before any process starts: config, layout, tokenizer, data, checkpoint compatibility
        cfg = preflight(load_config(args.config, args.overrides), world_size)
        check_unlocked(cfg.checkpoint.dir)  # another live run writes there: refuse now (rank 0 takes the lock)
    except (ConfigError, CheckpointLocked) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env = cpu_environment(env, args.nproc)
    try:  # hosts x slots x nodes = the world size checked above; addresses, port; the ranks' environment
        plan = plan_launch(args, world_size, env)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.hostfile = plan.hostfile
    env.update(plan.env)
    if args.num_nodes > 1 and args.master_addr:  # what this node's ranks will use (each rank decides for itself)
        plan.notes.append(choose_socket_interface(args.master_addr, dict(env)))
    for note in filter(None, plan.notes):
        print(note, flush=True)
    cmd = build_command(args)
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if args.dry_run:
        return 0
    if replace_process:
        sys.stderr.flush()
        os.execve(cmd[0], cmd, env)
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())

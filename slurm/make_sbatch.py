#!/usr/bin/env python3
"""Write an sbatch script for a largelm training run, from a YAML config and the cluster layout.

    python slurm/make_sbatch.py --config configs/gpt-125m.yaml --nodes 2 --gpus-per-node 8 \\
        --time 24:00:00 --partition gpu --account myproj -o gpt-125m.sbatch
    sbatch gpt-125m.sbatch                      # from the repository root
    sbatch gpt-125m.sbatch train.steps=20000    # extra config overrides

    python slurm/make_sbatch.py --config configs/gpt-tiny.yaml --nproc-per-node 2 -o tiny-cpu.sbatch  # CPU node

The config is validated (fields, world size = nodes x ranks per node) before anything is written. The script is
slurm/job.sbatch.in with the #SBATCH header and a few settings filled in; its body is the same for every job and
runs unchanged on CPU nodes (DeepSpeed's CPU accelerator, gloo) and GPU nodes (NCCL). See slurm/README.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "job.sbatch.in"
LAUNCHERS = ("deepspeed", "torchrun", "srun", "pdsh")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config, as the job will see it (relative to the "
                                                    "directory you submit from, or absolute)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: a CPU job")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks per node (default: --gpus-per-node, or 1 on CPU nodes)")
    p.add_argument("--cpus-per-node", type=int, default=None,
                   help="CPU cores for the ranks of one node (default: 1 per rank on CPU, 8 per GPU)")
    p.add_argument("--mem", help="memory per node, e.g. 200G (default: the partition's default)")
    p.add_argument("--time", default="01:00:00", help="time limit, e.g. 24:00:00")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--job-name", help="default: the config's name")
    p.add_argument("--run-dir", help="checkpoints/, tensorboard/ and slurm/ logs (default: runs/<job-name>)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed",
                   help="deepspeed (default) or torchrun: one launcher per node started by srun (no ssh); "
                        "srun: srun starts every rank; pdsh: the deepspeed launcher with the job's hostfile, "
                        "reaching the other nodes over pdsh/ssh (GPT-NeoX style)")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="USR1 this many seconds before the time limit: checkpoint and requeue")
    p.add_argument("--max-requeues", type=int, default=20)
    p.add_argument("--venv", default=".venv", help="virtualenv activated by the job if it exists ('' for none)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra sbatch option, e.g. --sbatch=--exclusive (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config override baked into the script, e.g. --set train.steps=1000 (repeatable)")
    p.add_argument("-o", "--out", help="write the script here (default: stdout)")
    p.add_argument("--no-check", action="store_true", help="do not validate the config (no largelm import)")
    return p


def check_config(config: str, overrides: list[str], world_size: int) -> str:
    """Validate the config for this world size; returns its name."""
    sys.path.insert(0, str(HERE.parent))
    from largelm.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
        cfg.check_world_size(world_size)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    return cfg.name


def config_name(config: str) -> str:
    import yaml

    data = yaml.safe_load(Path(config).read_text()) or {}
    return str(data.get("name") or Path(config).stem)


def render(args: argparse.Namespace, argv: list[str], script_name: str = "<this script>") -> tuple[str, str]:
    """The script's text and the run directory."""
    nproc = args.nproc_per_node or args.gpus_per_node or 1
    if args.nodes < 1 or nproc < 1:
        raise SystemExit("error: --nodes and --nproc-per-node must be at least 1")
    if args.gpus_per_node and nproc != args.gpus_per_node:
        raise SystemExit(f"error: --nproc-per-node={nproc} differs from --gpus-per-node={args.gpus_per_node}: "
                         "one rank per GPU")
    name = (check_config(args.config, args.overrides, args.nodes * nproc) if not args.no_check
            else config_name(args.config))
    job_name = args.job_name or name
    run_dir = args.run_dir or f"runs/{job_name}"
    cpus = args.cpus_per_node or (8 * args.gpus_per_node if args.gpus_per_node else nproc)
    if args.launcher == "srun":
        if cpus % nproc:
            raise SystemExit(f"error: --cpus-per-node={cpus} is not divisible by {nproc} ranks per node")
        tasks, cpus_per_task = nproc, cpus // nproc
    else:
        tasks, cpus_per_task = 1, cpus
    lines = [f"--nodes={args.nodes}", f"--ntasks-per-node={tasks}", f"--cpus-per-task={cpus_per_task}"]
    if args.gpus_per_node:
        lines.append(f"--gpus-per-node={args.gpus_per_node}")
    for flag in ("mem", "time", "partition", "account", "qos", "constraint"):
        value = getattr(args, flag)
        if value:
            lines.append(f"--{flag}={value}")
    lines += args.sbatch
    values = {
        "GENERATED": "Generated by: python slurm/make_sbatch.py " + shlex.join(argv),
        "SCRIPT": script_name,
        "STOP_HINT": "scancel --batch --signal=USR1 <jobid>",
        "JOB_NAME": job_name,
        "SBATCH_LINES": "\n".join(f"#SBATCH {line}" for line in lines),
        "RUN_DIR": run_dir,
        "SIGNAL": f"B:USR1@{args.signal_seconds}",
        "SIGNAL_SECONDS": str(args.signal_seconds),
        "CONFIG": shlex.quote(args.config),
        "LAUNCHER": args.launcher,
        "NPROC_PER_NODE": str(nproc),
        "MAX_REQUEUES": str(args.max_requeues),
        "OVERRIDES": " ".join(shlex.quote(o) for o in args.overrides),
        "VENV": shlex.quote(args.venv) if args.venv else "''",
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        raise SystemExit(f"error: unfilled placeholder in {TEMPLATE}: {text[text.index('{{'):][:40]}")
    return text, run_dir


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.out:
        out = Path(args.out)
        text, run_dir = render(args, argv, script_name=str(out))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.chmod(0o755)
        print(f"wrote {out}", file=sys.stderr)
    else:
        text, run_dir = render(args, argv)
        sys.stdout.write(text)
    # Slurm opens --output before the script runs and does not create directories.
    Path(run_dir, "slurm").mkdir(parents=True, exist_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

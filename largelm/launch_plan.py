"""What ``largelm-launch`` checks and prepares for a multi-node launch, before it starts anything.

Each check stops a launch that would otherwise go wrong silently or late (each was seen on two namespace "hosts"):

* the hostfile: malformed lines, fewer hosts than ``--num-nodes`` (the run trained on one host with world size 1
  and exit 0), fewer slots than ``--nproc``;
* per-node launches (``--no-ssh``): ``--master-addr`` and an in-range ``--node-rank`` are required (a forgotten
  rank made two nodes each open their own store and wait 30 minutes; without the address DeepSpeed ran
  ``ssh <host> hostname -I``), and DeepSpeed's runner gets the hostfile it insists on;
* a master address that resolves to loopback on a multi-node run; a master port already taken on this host;
* the environment: ranks started over pdsh/ssh get only what DeepSpeed forwards, so everything ``largelm-launch``
  sets or the user exported for the ranks goes into the env file DeepSpeed reads (``DS_ENV_FILE``).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from deepspeed.launcher import runner

from largelm.fileio import write_text_atomic
from largelm.parallel.network import NetworkError, check_master_address, check_port_free, is_local_address

DEEPSPEED_DEFAULT_PORT = 29500
# Prefixes of the variables the ranks need wherever they run (threads, allocator, accelerator, collectives, ours).
FORWARDED_PREFIXES = ("OMP_", "MKL_", "KMP_", "DS_", "MALLOC_", "GLOO_", "NCCL_", "LARGELM_", "TORCH_", "ATEN_",
                      "ONEDNN_", "CUDA_", "HF_", "PYTHON")
_HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


class LaunchError(ValueError):
    """A launch that cannot run as asked; the message names the option and the numbers."""


@dataclass
class LaunchPlan:
    hostfile: Optional[str] = None  # the hostfile to hand DeepSpeed's runner (written here for per-node launches)
    env: dict = field(default_factory=dict)  # added to the launcher's environment
    notes: list = field(default_factory=list)  # printed before the launch


def read_hostfile(path: str) -> dict[str, int]:
    """``host slots=N`` per line (comments and blank lines allowed), strictly: anything else names file:line."""
    if not Path(path).is_file():
        raise LaunchError(f"--hostfile {path} does not exist")
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        match = _HOSTFILE_LINE.match(text)
        if text and (match is None or int(match.group(2)) < 1):
            raise LaunchError(f"--hostfile {path}:{number}: {line.strip()!r} is not 'HOST slots=N' with N >= 1")
    try:
        pool = runner.fetch_hostfile(path)  # DeepSpeed's own reading, so both agree on what the file says
    except ValueError as err:
        raise LaunchError(f"--hostfile {path}: {err}") from None
    return dict(pool)


def _active_hosts(args: argparse.Namespace) -> dict[str, int]:
    pool = read_hostfile(args.hostfile)
    try:
        active = runner.parse_inclusion_exclusion(pool, args.include or "", args.exclude or "")
    except (ValueError, KeyError) as err:
        raise LaunchError(f"--include/--exclude {args.include or args.exclude!r} on --hostfile {args.hostfile}: "
                          f"{err}") from None
    return {host: len(slots) for host, slots in active.items()}


def _check_hosts(args: argparse.Namespace, world_size: int) -> dict[str, int]:
    hosts = _active_hosts(args)
    if len(hosts) < args.num_nodes:
        raise LaunchError(f"--hostfile {args.hostfile} gives {len(hosts)} host(s) ({', '.join(hosts)}) but "
                          f"--num-nodes is {args.num_nodes}: the run would start {len(hosts) * args.nproc} ranks, not "
                          f"the {world_size} (= {args.num_nodes} nodes x {args.nproc}) the config was checked for")
    short = {h: n for h, n in list(hosts.items())[: args.num_nodes] if n < args.nproc}
    if short:
        raise LaunchError(f"--nproc {args.nproc} ranks per node, but --hostfile {args.hostfile} gives "
                          + ", ".join(f"{h} slots={n}" for h, n in short.items()))
    return hosts


def _per_node_hostfile(num_nodes: int, nproc: int) -> str:
    """DeepSpeed's runner needs a hostfile for ``--num_nodes > 1`` even with ``--no_ssh`` (it only counts and
    orders the entries then): one line per node. Its content depends on the layout only, so one file per layout
    (and user) serves every launch."""
    path = Path(tempfile.gettempdir()) / f"largelm-{os.getuid()}-nodes-{num_nodes}x{nproc}.hostfile"
    write_text_atomic(path, "".join(f"node{i} slots={nproc}\n" for i in range(num_nodes)))
    return str(path)


def _env_file(env: dict) -> str:
    """The variables ranks on other hosts need, in DeepSpeed's env-file format (``KEY=VALUE`` per line)."""
    fd, path = tempfile.mkstemp(prefix="largelm-", suffix=".deepspeed_env")  # 0600: values may be secrets
    with os.fdopen(fd, "w") as fh:
        for key, value in sorted(env.items()):
            if key.startswith(FORWARDED_PREFIXES) and "\n" not in value and key != "DS_ENV_FILE":
                fh.write(f"{key}={value}\n")
    return path


def plan_launch(args: argparse.Namespace, world_size: int, env: dict) -> LaunchPlan:
    """Check the node layout, addresses and port for ``args``; say what to add to the launcher's command and env."""
    plan = LaunchPlan(hostfile=args.hostfile)
    per_node = args.no_ssh or (args.launcher == "torchrun" and args.num_nodes > 1)
    if per_node:
        if args.master_addr is None:
            raise LaunchError("a per-node launch (--no-ssh, or torchrun with --num-nodes > 1) needs --master-addr: "
                              "node 0's address, the same on every node")
        if args.node_rank is None or not 0 <= args.node_rank < args.num_nodes:
            given = "missing" if args.node_rank is None else f"{args.node_rank}"
            raise LaunchError(f"--node-rank is {given}: each node of a per-node launch needs its own, 0 .. "
                              f"{args.num_nodes - 1} (--num-nodes {args.num_nodes})")
    hosts = _check_hosts(args, world_size) if args.hostfile else None
    if args.launcher == "deepspeed" and args.num_nodes > 1 and hosts is None:
        if not args.no_ssh:
            raise LaunchError("--num-nodes > 1 needs --hostfile (or --no-ssh with one launch per node)")
        plan.hostfile = _per_node_hostfile(args.num_nodes, args.nproc)
    try:
        master_ip = None
        if args.master_addr is not None:
            master_ip = check_master_address(args.master_addr, args.num_nodes)
        elif args.num_nodes == 1:
            master_ip = "127.0.0.1"
        standalone = args.launcher == "torchrun" and args.num_nodes == 1  # torchrun picks its own free port
        if master_ip is not None and is_local_address(master_ip) and not standalone \
                and (not per_node or args.node_rank == 0):
            check_port_free(master_ip, args.master_port or DEEPSPEED_DEFAULT_PORT)
    except NetworkError as err:
        raise LaunchError(str(err)) from None
    if hosts is not None and len(list(hosts)[: args.num_nodes]) > 1 and not args.no_ssh:
        plan.env["DS_ENV_FILE"] = _env_file(env)  # read by DeepSpeed's runner when it builds the pdsh command
        plan.notes.append(f"environment for the ranks on other hosts: {plan.env['DS_ENV_FILE']}")
    return plan

"""A real Slurm cluster on this machine (munged + slurmctld + slurmd), for tests and for trying ``slurm/``.

    cluster = LocalSlurm()          # one node on localhost; state in /tmp/largelm-slurm (LARGELM_SLURM_DIR overrides)
    cluster.start()                 # installs slurm-wlm + munge with apt if missing; idempotent
    job = cluster.sbatch("job.sbatch")
    cluster.wait(job)               # -> final JobState
    cluster.stop()                  # cancels jobs, kills the daemons and every process they started

Everything lives in one directory: a generated munge key, slurm.conf, state/spool dirs, logs, pid files. No
system file is touched and no systemd unit is used. The daemons run as root (``SlurmUser=root``) and listen on
two free ports, so a system Slurm on the default ports is not disturbed. Clients (``sbatch``, ``squeue``,
``scontrol``...) find the cluster through ``SLURM_CONF`` in ``cluster.env``; the test process's own environment
is left alone.

``start()`` first runs ``stop()`` on what a previous (maybe crashed) run left in the same directory: every
process whose environment names this cluster's slurm.conf (daemons, slurmstepd, job processes) is killed by pid.
If anything fails, ``SlurmError`` carries the daemon logs: callers must let it fail the test, never skip.

Several nodes: ``LocalSlurm(root, nodes=[SlurmNode(name, address, netns), ...])`` with network namespaces the
caller built (tests/netns_hosts.py). Each node's slurmd runs inside its namespace and its own UTS namespace (its
host name is the node name, so slurmd finds itself in slurm.conf and job processes see it), listening on the node's
address; slurmctld runs the same way on the first node. Clients run inside the first node's namespace. The one
munged (a Unix socket in this directory) serves every namespace.

Run ``python tests/slurm_cluster.py start|stop|status`` to keep a cluster up by hand (see slurm/README.md).
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


class SlurmError(RuntimeError):
    """The local cluster could not be installed, started or used; the message says why (with log tails)."""


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def ensure_installed(log=print) -> None:
    """Install Debian's slurmctld/slurmd/slurm-client/munge if a binary is missing (needs root and apt)."""
    needed = ["slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel", "munged", "munge"]
    missing = [b for b in needed if not shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmError(f"Slurm binaries missing ({', '.join(missing)}) and cannot apt-get install them "
                         f"(need root and apt): install {' '.join(APT_PACKAGES)} first")
    log(f"installing {' '.join(APT_PACKAGES)} with apt-get (missing: {', '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SlurmError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")


@dataclass(frozen=True)
class SlurmNode:
    name: str  # NodeName, and the node's host name inside its namespaces
    address: str  # NodeAddr: where slurmctld and the other nodes reach it
    netns: Optional[str] = None  # network namespace its daemons (and so its jobs) run in; None: this host
    hosts_file: Optional[str] = None  # the node's /etc/hosts (names of all nodes), bind-mounted inside it

    def wrap(self, cmd: list[str], own_hostname: bool = True) -> list[str]:
        """``cmd`` run inside this node: its network namespace and (``own_hostname``) its own UTS and mount
        namespaces (host name = node name, /etc/hosts = ``hosts_file``). Entered with nsenter, not `ip netns exec`,
        which mounts a fresh sysfs and so hides /sys/fs/cgroup, without which slurmd does not start."""
        if self.netns is None:
            return cmd
        if not own_hostname:
            return ["ip", "netns", "exec", self.netns, *cmd]
        bind = f'mount --bind {shlex.quote(self.hosts_file)} /etc/hosts && ' if self.hosts_file else ""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts", "sh", "-c",
                f'{bind}hostname "$0" && exec "$@"', self.name, *cmd]


class LocalSlurm:
    def __init__(self, root: str | os.PathLike | None = None, cpus: int | None = None,
                 nodes: Optional[list[SlurmNode]] = None):
        self.root = Path(root or os.environ.get("LARGELM_SLURM_DIR", f"/tmp/largelm-slurm-{os.getuid()}")).absolute()
        self.conf = self.root / "slurm.conf"
        self.nodes = nodes or [SlurmNode(socket.gethostname().split(".")[0], "127.0.0.1")]
        self.hostname = self.nodes[0].name  # the first node: the batch script runs there
        self.cpus = cpus
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for var in [v for v in self.env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":  # a test run inside a Slurm job must not leak that job's settings
                del self.env[var]
        sbin = "/usr/sbin:/sbin"
        if sbin not in self.env.get("PATH", ""):
            self.env["PATH"] = self.env.get("PATH", "") + ":" + sbin

    # ---------------------------------------------------------------- paths
    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def _pidfiles(self) -> list[Path]:
        return [self.root / "run" / "slurmctld.pid", self.root / "munge" / "munged.pid",
                *(self.root / "run" / f"slurmd-{node.name}.pid" for node in self.nodes)]

    def logs(self, lines: int = 40) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*.log")) + [self.root / "munge" / "munged.log"]:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(out)

    # ---------------------------------------------------------------- commands
    def client(self, cmd: list[str]) -> list[str]:
        """A client command (sbatch, scontrol, ...) run where slurmctld is reachable: the first node's network."""
        return self.nodes[0].wrap(cmd, own_hostname=False)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.client(list(cmd)), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise SlurmError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str | os.PathLike, cwd: str | os.PathLike | None = None) -> int:
        """``sbatch --parsable ARGS`` (options, then the script and its arguments); returns the job id."""
        cmd = ["sbatch", "--parsable", *map(str, args)]
        proc = subprocess.run(self.client(cmd), env=self.env, capture_output=True, text=True, cwd=cwd, timeout=60)
        if proc.returncode:
            raise SlurmError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}\n{self.logs()}")
        return int(proc.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...); {} if the job is unknown."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if proc.returncode:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def wait(self, job_id: int, timeout: float = 300, states=FINAL_STATES, poll: float = 1.0) -> str:
        """Wait until the job's state is in ``states``; returns it. Raises SlurmError (with logs) on timeout."""
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.job_info(job_id).get("JobState", "?")
            if state in states:
                return state
            time.sleep(poll)
        raise SlurmError(f"job {job_id} still {state} after {timeout:.0f}s\n{self.job_info(job_id)}\n{self.logs()}")

    # ---------------------------------------------------------------- lifecycle
    def write_config(self) -> None:
        ctld_port, slurmd_port = _free_ports(2)
        probe = subprocess.run(["slurmd", "-C"], env=self.env, capture_output=True, text=True, check=True)
        fields = dict(re.findall(r"(\w+)=(\S+)", probe.stdout.splitlines()[0]))  # "NodeName=vm CPUs=2 ... "
        cpus = self.cpus or int(fields["CPUs"])
        memory = int(fields.get("RealMemory", "1000"))
        r = self.root
        head = self.nodes[0]
        node_lines = "\n".join(f"NodeName={n.name} NodeAddr={n.address} CPUs={cpus} RealMemory={memory} State=UNKNOWN"
                               for n in self.nodes)
        conf = f"""# Generated by tests/slurm_cluster.py: a CPU-only cluster of {len(self.nodes)} node(s), this machine.
ClusterName=largelm-local
SlurmctldHost={head.name}({head.address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire=5
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# schedule every 2 s (default 60 s / backfill 30 s): a requeued job restarts within seconds
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=3600
{node_lines}
PartitionName=debug Nodes={",".join(n.name for n in self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        self.conf.write_text(conf)

    def _acquire(self, timeout: float, log) -> None:
        """One cluster per directory: a second test session waits here until the first one has stopped."""
        if getattr(self, "_lock", None):
            return
        lock = open(f"{self.root}.lock", "w")
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock = lock
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.close()
                    raise SlurmError(f"another process holds {self.root}.lock (a test session using the local "
                                     f"cluster) for more than {timeout:.0f}s") from None
                if not said:
                    log(f"waiting for another session's local Slurm cluster ({self.root}.lock)")
                    said = True
                time.sleep(2)

    def _release(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
            self._lock = None

    def start(self, timeout: float = 60, log=print, lock_timeout: float = 1800) -> "LocalSlurm":
        ensure_installed(log)
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self._acquire(lock_timeout, log)
        try:
            self.stop(release=False)  # whatever a previous (maybe killed) session left
            self._start(timeout)
        except (SlurmError, OSError, subprocess.SubprocessError) as err:
            logs = self.logs()
            self.stop()  # (also releases the lock)
            raise SlurmError(f"local Slurm cluster did not start: {err}\n{logs}") from None
        return self

    def _start(self, timeout: float) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)
        for sub in ("state", "spool", "run", "log", "munge"):
            (self.root / sub).mkdir(parents=True)
        self.root.chmod(0o755)
        (self.root / "munge").chmod(0o755)  # munged wants a socket dir that everybody can traverse
        key_dir = self.root / "munge-key"
        key_dir.mkdir(mode=0o700)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        m = self.root / "munge"
        self.run("munged", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                 f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed")
        self.run("munge", "-S", str(self.munge_socket), "-n")  # the daemon answers
        self.write_config()
        self._daemon(self.nodes[0], "slurmctld", "-i")
        for node in self.nodes:
            self._daemon(node, "slurmd")
        self._wait_idle(timeout)

    def _daemon(self, node: SlurmNode, *cmd: str) -> None:
        proc = subprocess.run(node.wrap(list(cmd)), env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode:
            raise SlurmError(f"{' '.join(cmd)} on {node.name} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            proc = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
            out = proc.stdout.strip() + proc.stderr.strip()
            states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
            if proc.returncode == 0 and all(states.get(n.name) == "idle" for n in self.nodes):
                return
            time.sleep(0.5)
        raise SlurmError(f"nodes not all idle after {timeout:.0f}s (sinfo: {out!r})")

    def _our_processes(self) -> list[int]:
        """Pids whose environment names this cluster's slurm.conf: daemons, slurmstepd, job processes."""
        me = {os.getpid(), os.getppid()}
        needle = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in me:
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if needle in environ.split(b"\0"):
                pids.append(int(entry.name))
        return pids

    def running(self) -> bool:
        ctld = self.root / "run" / "slurmctld.pid"
        try:
            return self._is_ours(int(ctld.read_text().strip())) and self.run("sinfo", "-h", check=False).returncode == 0
        except (OSError, ValueError):
            return False

    def stop(self, release: bool = True) -> None:
        """Cancel every job, stop the daemons, kill whatever they left. Safe to call when nothing runs."""
        try:
            self._stop()
        finally:
            if release:
                self._release()

    def _stop(self) -> None:
        if not self.root.exists():
            return
        ctld = self.root / "run" / "slurmctld.pid"
        if self.conf.exists() and ctld.exists() and self._is_ours(int(ctld.read_text().strip() or 0)):
            try:  # let Slurm end the jobs first (their processes get SIGTERM, then SIGKILL)
                self.run("scancel", "--full", "--user", str(os.getuid()), check=False, timeout=10)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    proc = self.run("squeue", "-h", "-t", "all", "-o", "%T", check=False, timeout=10)
                    if proc.returncode or not set(proc.stdout.split()) & {"RUNNING", "COMPLETING", "PENDING",
                                                                           "CONFIGURING", "REQUEUED"}:
                        break
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        pids = set(self._our_processes())
        for pidfile in self._pidfiles():
            try:
                pids.add(int(pidfile.read_text().strip()))
            except (OSError, ValueError):
                pass
        pids = {p for p in pids if self._is_ours(p)}
        self._kill(pids, signal.SIGTERM, grace=10)
        self._kill(set(self._our_processes()), signal.SIGKILL, grace=5)

    def _is_ours(self, pid: int) -> bool:
        """The pid (from a pid file) still belongs to this cluster: a daemon started with our paths."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return str(self.root).encode() in cmdline or f"SLURM_CONF={self.conf}".encode() in environ.split(b"\0")

    @staticmethod
    def _kill(pids: set[int], sig: int, grace: float) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and not is_zombie(p)}
            time.sleep(0.2)


def is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


if __name__ == "__main__":
    cluster = LocalSlurm()
    action = sys.argv[1] if len(sys.argv) > 1 else "status"
    if action == "start":
        cluster.start()
        print(f"local Slurm up: export SLURM_CONF={cluster.conf}")
    elif action == "stop":
        cluster.stop()
        print("local Slurm stopped")
    else:
        print("running" if cluster.running() else "not running", f"(SLURM_CONF={cluster.conf})")

"""One run per checkpoint directory: an exclusive lock file held by rank 0 for the run's whole life.

Two runs writing one ``checkpoint.dir`` (a duplicate ``sbatch``, an overlapping requeue, two configs left on the
default directory) destroy each other's checkpoints: one run's clean-up deletes the other's save in progress, its
rotation deletes the other's newest checkpoint, ``latest`` ends up naming a directory that is gone.

Why a lock *file* created with ``O_CREAT | O_EXCL`` and not ``flock``: checkpoint directories live on shared
filesystems, where ``flock`` is per client on some NFS setups (two hosts both "hold" it) and absent on others,
while exclusive creation is atomic on NFSv3+ and on every local and parallel filesystem we target. The file
records who holds it (host, pid, Slurm job id, start time); the holder touches it every ``HEARTBEAT_S`` seconds so
that anyone refused can see whether it is alive. A holder is *stale* when it ran on this host and its pid is gone,
or when it is an earlier incarnation of the same Slurm job (a requeue on another node); then the lock is taken
over, with a warning. A holder on another host is never guessed dead: the error says who holds it, when it was
last seen, and how to break the lock. Limits: a pid reused by an unrelated process on the same host keeps a dead
run's lock (the error names it); clocks of different hosts may disagree about the heartbeat's age.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from largelm.fileio import process_gone_here

log = logging.getLogger(__name__)

LOCK_NAME = ".largelm.lock"
HEARTBEAT_S = 30.0


class CheckpointLocked(RuntimeError):
    """Another live run holds this checkpoint directory."""


def _holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.time()}


def read_holder(root: Path) -> Optional[dict]:
    """The lock file's record (None: not locked). A file that does not parse is reported as an unknown holder."""
    path = Path(root) / LOCK_NAME
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        if not isinstance(holder, dict):
            raise ValueError(text)
    except ValueError:  # json.JSONDecodeError included
        holder = {"host": "?", "pid": -1, "job_id": None, "unreadable": True}
    holder["heartbeat_age_s"] = max(0.0, time.time() - mtime)
    return holder


def stale_reason(holder: dict) -> Optional[str]:
    """Why ``holder`` can be taken over from (None: it may be alive; refuse)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("job_id") == job and holder.get("pid") != os.getpid():
        return f"it is an earlier run of this Slurm job {job} (requeued)"
    if process_gone_here(holder):
        return f"its process {holder['pid']} on this host is gone"
    return None


def describe(holder: dict, path: Path) -> str:
    job = f", Slurm job {holder['job_id']}" if holder.get("job_id") else ""
    seen = f"last heartbeat {holder['heartbeat_age_s']:.0f} s ago (every {HEARTBEAT_S:.0f} s while alive)"
    who = f"host {holder.get('host')} pid {holder.get('pid')}"
    if holder.get("unreadable"):
        who = "an unreadable lock file"
    return (f"checkpoint directory {path.parent} is in use by another run ({who}{job}; {seen}). Two runs in one "
            f"directory delete each other's checkpoints: give this run its own checkpoint.dir, or, if that run is "
            f"gone, remove {path}")


class CheckpointDirLock:
    """``with CheckpointDirLock(dir):`` holds the directory for this process; raises ``CheckpointLocked``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._record: Optional[dict] = None

    def acquire(self) -> "CheckpointDirLock":
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a takeover races with other takers: whoever creates the file holds the lock
            record = _holder_record()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_holder(self.root)
                if holder is None:
                    continue  # released in between
                reason = stale_reason(holder)
                if reason is None:
                    raise CheckpointLocked(describe(holder, self.path)) from None
                log.warning("taking over the lock of %s from host %s pid %s: %s", self.root, holder.get("host"),
                            holder.get("pid"), reason)
                try:
                    os.rename(self.path, self.path.with_name(f"{LOCK_NAME}.stale-{holder.get('pid')}"))
                except FileNotFoundError:
                    pass  # another taker moved it first
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self._record = record
            self._thread = threading.Thread(target=self._heartbeat, name="checkpoint-lock", daemon=True)
            self._thread.start()
            return self
        raise CheckpointLocked(f"could not take the lock {self.path}: it kept changing hands")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # removed by hand (the error message says how): keep running, stop beating
                return

    def release(self) -> None:
        """Remove the lock file if it is still this process's (never another run's that took it over)."""
        self._stop.set()
        if self._record is None:
            return
        holder = read_holder(self.root)
        if holder and holder.get("pid") == self._record["pid"] and holder.get("started") == self._record["started"]:
            self.path.unlink(missing_ok=True)
        self._record = None

    def __enter__(self) -> "CheckpointDirLock":
        return self.acquire()

    def __exit__(self, *_exc) -> None:
        self.release()


def check_unlocked(root: str | Path) -> None:
    """For the launcher (before any process starts): refuse at once when a live run holds ``root``."""
    holder = read_holder(Path(root))
    if holder is not None and stale_reason(holder) is None:
        raise CheckpointLocked(describe(holder, Path(root) / LOCK_NAME))

"""DeepSpeed's CPU shared-memory comm op (``deepspeed_shm_comm``), built where it cannot thrash, loaded where it
cannot hang.

Without CUDA, ``deepspeed.init_distributed`` JIT-builds and loads this op through torch's ``cpp_extension``, which
guards the build with a file baton (``<build dir>/lock``): created with ``O_EXCL``, removed when the build ends,
and waited on - forever, silently, at ~0% CPU - by every other process while it exists. A run killed during that
window (a closed terminal, ``scancel``, preemption, SIGKILL) leaves the file, and every later launch on the machine
hangs at start-up. And the build directory was one per Python version: two configurations (e.g. a CPU-capability
emulation, another environment on a shared ``~/.cache``) rebuilt the op in turn, 35-78 s each.

``prepare_cpu_comm_op()`` (called by ``groups.init_distributed`` before DeepSpeed's, on CPU only):

* points ``TORCH_EXTENSIONS_DIR`` (unless the user set it) at a directory keyed by everything the build depends on
  - interpreter prefix, torch and DeepSpeed versions, the compiler flags DeepSpeed derives from this CPU, the ninja
  and compiler found on PATH (``build_tools``) - so each configuration keeps its own build and reuses it;
* loads the op under a lock of our own (``O_EXCL`` file recording host and pid) *before* any rendezvous, so the
  process holding it never waits on another rank. Holding our lock, a torch baton in the build directory can only be
  a dead process's: it is removed with a warning. A holder of our lock that is dead on this host is taken over; a
  live one is waited for with a message every ``SAY_EVERY_S`` naming it.

DeepSpeed keeps the loaded module (``OpBuilder._loaded_ops``), so its own ``init_distributed`` does not build again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import deepspeed
import torch

from largelm.fileio import process_gone_here

SAY_EVERY_S = 5.0
_LOCK = "largelm-build.lock"


def _builder():
    from deepspeed.accelerator import get_accelerator  # lazy (probes the accelerator on import)

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def build_tools() -> list[str]:
    """The ninja and C++ compiler torch's cpp_extension will run (from PATH, ``CXX``), with ninja's version. Two ninja
    versions write build logs the other one discards (ninja 1.11's v5 and 1.13's v7 hash commands differently), so
    sharing one directory rebuilt the op at every switch: seen with Debian's ninja and the venv's pip ninja, which
    is first on PATH only while the venv is activated (Slurm jobs) and not otherwise (tests, a plain launch); now
    ``interpreter_tools_first`` puts it first either way."""
    ninja = shutil.which("ninja") or "ninja"
    try:
        version = subprocess.run([ninja, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = "?"
    cxx = os.environ.get("CXX", "c++")
    return [ninja, version, shutil.which(cxx) or cxx]


def extensions_dir(builder) -> Path:
    """A build directory per build configuration (the op's name is a subdirectory below it, as torch makes it)."""
    key = json.dumps([sys.prefix, torch.__version__, deepspeed.__version__, builder.cxx_args(),
                      builder.strip_empty_entries(builder.extra_ldflags()), *build_tools()])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "largelm" / "torch_extensions" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _holder(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _acquire(lock: Path, what: str) -> None:
    waited_since, said = time.monotonic(), 0.0
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder is not None and process_gone_here(holder):
                print(f"warning: removing a stale build lock {lock} of pid {holder.get('pid')} (gone)", flush=True)
                lock.unlink(missing_ok=True)
                continue
            waited = time.monotonic() - waited_since
            if waited - said >= SAY_EVERY_S:
                said = waited
                who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "another process"
                print(f"waiting {waited:.0f} s for {who} building {what} ({lock})", flush=True)
            time.sleep(0.2)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump({"host": socket.gethostname(), "pid": os.getpid()}, fh)
        return


def prepare_cpu_comm_op() -> Optional[str]:
    """Build (if needed) and load DeepSpeed's CPU comm op safely (module docstring); returns its build directory."""
    if torch.cuda.is_available():
        return None
    builder = _builder()
    if builder is None:
        return None
    with interpreter_tools_first():
        return _prepare(builder)


@contextlib.contextmanager
def interpreter_tools_first():
    """This interpreter's bin directory (a venv's pip ninja) first on PATH while the op is keyed and built: the same
    ninja whether the venv is activated or not, so one build serves both (``build_tools``)."""
    saved = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), *([saved] if saved else [])])
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved


def _prepare(builder) -> str:
    root = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir(builder))))
    build_dir = root / builder.name
    build_dir.mkdir(parents=True, exist_ok=True)
    lock = build_dir / _LOCK
    _acquire(lock, builder.name)
    try:
        baton = build_dir / "lock"  # torch's FileBaton: with our lock held, only a dead build can have left it
        if baton.exists():
            print(f"warning: removing {baton}, left by a build that was killed (every later launch waited on it)",
                  flush=True)
            baton.unlink(missing_ok=True)
        builder.load(verbose=False)
    finally:
        lock.unlink(missing_ok=True)
    return str(build_dir)

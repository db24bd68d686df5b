"""DeepSpeed 0.19.8 launcher patches (entries ``local_launch_in_process`` and ``fast_launch_poll`` of
``largelm.parallel.deepspeed_compat.PATCHES``), used by ``largelm/ds_launcher.py``, which says why.

* ``local_launch_in_process()``: while active, ``deepspeed.launcher.runner``'s ``subprocess`` is a ``Spawner``: the
  runner's ``<python> -u -m deepspeed.launcher.launch ...`` command for this node raises ``LocalLaunch`` (carrying
  that command and environment) instead of starting a second Python process; any other command (pdsh, mpirun,
  srun, ssh checks) is started by the real ``subprocess``.
* ``fast_launch_poll()``: while active, ``deepspeed.launcher.launch``'s ``time`` caps ``sleep`` at ``POLL_S`` (its
  only sleep is the loop polling its ranks, 1 s in DeepSpeed).
* ``continue_stopped_ranks()``: while active, ``deepspeed.launcher.launch.terminate_process_tree`` first continues
  (SIGCONT) every process of the tree, then runs DeepSpeed's own (SIGTERM, 30 s, SIGKILL). A stopped process - a
  frozen rank (SIGSTOP, a debugger, a node under memory pressure) - cannot act on SIGTERM until continued, so
  DeepSpeed waited the whole 30 s before killing it; Slurm does the same (SIGCONT before its signals).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional

import psutil
from deepspeed.launcher import launch, runner

from largelm.parallel.deepspeed_compat.version import check_deepspeed_version

POLL_S = 0.1  # how often ``launch`` checks whether its ranks have exited (DeepSpeed: 1 s)
LAUNCH_MODULE = "deepspeed.launcher.launch"


class LocalLaunch(Exception):
    """Raised instead of starting the runner's local ``deepspeed.launcher.launch`` process."""

    def __init__(self, cmd: list, env: Optional[dict]):
        super().__init__(cmd)
        self.cmd, self.env = cmd, env


class Spawner:
    """``subprocess`` for the runner module: the local launch command becomes ``LocalLaunch``; anything else (the
    pdsh/mpirun/srun command, ssh checks) goes to the real module."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def Popen(self, cmd, *args, **kwargs):  # noqa: N802 (subprocess's name)
        if is_local_launch(cmd) and not args and set(kwargs) <= {"env"}:
            raise LocalLaunch(list(cmd), kwargs.get("env"))
        return self._real.Popen(cmd, *args, **kwargs)


class FastPoll:
    """``time`` for the launch module: ``sleep`` capped at ``POLL_S`` (its only sleep is the rank polling loop's)."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, POLL_S))


def is_local_launch(cmd) -> bool:
    """Whether ``cmd`` is the runner's ``<python> -u -m deepspeed.launcher.launch ...`` for this node."""
    return isinstance(cmd, (list, tuple)) and list(cmd[1:4]) == ["-u", "-m", LAUNCH_MODULE]


@contextlib.contextmanager
def local_launch_in_process() -> Iterator[None]:
    """``runner.subprocess`` is a ``Spawner`` inside the block; the real module again after it."""
    check_deepspeed_version()
    real = runner.subprocess
    runner.subprocess = Spawner(real)
    try:
        yield
    finally:
        runner.subprocess = real


@contextlib.contextmanager
def fast_launch_poll() -> Iterator[None]:
    """``launch.time`` is a ``FastPoll`` inside the block; the real ``time`` module again after it."""
    check_deepspeed_version()
    launch.time = FastPoll()
    try:
        yield
    finally:
        launch.time = time


@contextlib.contextmanager
def continue_stopped_ranks() -> Iterator[None]:
    """``launch.terminate_process_tree`` continues the tree before DeepSpeed's SIGTERM inside the block."""
    check_deepspeed_version()
    real = launch.terminate_process_tree

    def terminate_process_tree(pid):
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for process in tree:
            try:
                process.resume()  # SIGCONT: harmless to a running process
            except psutil.NoSuchProcess:
                pass
        real(pid)

    launch.terminate_process_tree = terminate_process_tree
    try:
        yield
    finally:
        launch.terminate_process_tree = real

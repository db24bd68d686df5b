"""DeepSpeed's launcher (0.19.8) as ``largelm-launch`` runs it: the same runner and per-node launcher code, in one
process instead of two, polling its ranks every 0.1 s, and exiting without the interpreter's teardown.

    python -m largelm.ds_launcher --num_gpus=2 --module largelm.train.main --config c.yaml   # = deepspeed ...

``deepspeed`` runs two Python processes above the ranks: ``deepspeed.launcher.runner`` (hostfile, include/exclude
-> a ``deepspeed.launcher.launch`` command) and, for this node, ``deepspeed.launcher.launch`` (starts the ranks,
polls them, kills them all when one fails). Both import deepspeed, hence torch. On a 2-core CPU machine each of them
spent 2-4 s importing and 1-3 s in the interpreter's teardown at exit (pure CPU, after the last rank had exited),
and ``launch`` polls its ranks with ``time.sleep(1)``, once more after the last one has exited: together 5-10 s of
every run's start and end, which every launcher test pays. Here, with nothing else changed:

* A launch on this node only (one node without a hostfile, or ``--no_ssh``: the runner's "local" path, which
  starts ``python -u -m deepspeed.launcher.launch ...`` with a copy of the environment) runs that command's
  ``deepspeed.launcher.launch.main`` in this process, with that command's arguments and environment. Launches that
  reach other nodes (pdsh, mpirun, srun, ... commands) are started as DeepSpeed starts them, and those nodes run
  DeepSpeed's own ``deepspeed.launcher.launch``.
* ``launch`` polls its ranks every ``POLL_S`` instead of every second.
* Once the exit code is known, the process leaves with ``os._exit`` after flushing its output: the launcher holds no
  files or state that the teardown would save; it only spends CPU.

Exit codes and signal handling are DeepSpeed's: ``launch`` installs its SIGINT/SIGTERM handler (terminate the ranks,
wait up to 30 s, kill) and exits with the failing rank's code; the runner exits with ``launch``'s code.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

from largelm.cli import exit_now

POLL_S = 0.1  # how often ``launch`` checks whether its ranks have exited (DeepSpeed: 1 s)
LAUNCH_MODULE = "deepspeed.launcher.launch"


class _LocalLaunch(Exception):
    """Raised instead of starting the runner's local ``deepspeed.launcher.launch`` process."""

    def __init__(self, cmd: list, env: Optional[dict]):
        super().__init__(cmd)
        self.cmd, self.env = cmd, env


class _Spawner:
    """``subprocess`` for the runner module: the local launch command becomes ``_LocalLaunch``; anything else (the
    pdsh/mpirun/srun command, ssh checks) goes to the real module."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def Popen(self, cmd, *args, **kwargs):  # noqa: N802 (subprocess's name)
        if is_local_launch(cmd) and not args and set(kwargs) <= {"env"}:
            raise _LocalLaunch(list(cmd), kwargs.get("env"))
        return self._real.Popen(cmd, *args, **kwargs)


class _FastPoll:
    """``time`` for the launch module: ``sleep`` capped at ``POLL_S`` (its only sleep is the rank polling loop's)."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, POLL_S))


def is_local_launch(cmd) -> bool:
    """Whether ``cmd`` is the runner's ``<python> -u -m deepspeed.launcher.launch ...`` for this node."""
    return isinstance(cmd, (list, tuple)) and list(cmd[1:4]) == ["-u", "-m", LAUNCH_MODULE]


def _code(stop: SystemExit) -> int:
    code = stop.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # what SystemExit("message") prints
    return 1


def run_launch(argv: Sequence[str], env: Optional[dict] = None) -> int:
    """``deepspeed.launcher.launch`` with ``argv`` (and ``env`` as the environment), polling every ``POLL_S``."""
    from deepspeed.launcher import launch

    if env is not None and env != dict(os.environ):
        os.environ.clear()
        os.environ.update(env)
    launch.time, sys.argv = _FastPoll(), [launch.__file__, *argv]
    try:
        launch.main()
    except SystemExit as stop:
        return _code(stop)
    finally:
        launch.time = time
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The deepspeed runner on ``argv`` (its command line, e.g. ``--num_gpus=2 --module m ...``); its exit code."""
    from deepspeed.launcher import runner

    real = runner.subprocess
    runner.subprocess = _Spawner(real)
    try:
        runner.main(list(sys.argv[1:] if argv is None else argv))
        return 0
    except _LocalLaunch as caught:
        local = caught
    except SystemExit as stop:
        return _code(stop)
    finally:
        runner.subprocess = real
    return run_launch(local.cmd[4:], local.env)  # outside the handler: its errors are not "during handling"


if __name__ == "__main__":
    exit_now(main())

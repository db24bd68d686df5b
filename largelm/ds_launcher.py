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
* ``launch`` polls its ranks every ``POLL_S`` (0.1 s, ``largelm.parallel.deepspeed_compat.launcher``) instead of
  every second.
* Once the exit code is known, the process leaves with ``os._exit`` after flushing its output: the launcher holds no
  files or state that the teardown would save; it only spends CPU.

The two DeepSpeed patches (``runner.subprocess``, ``launch.time``) are context managers of
``largelm.parallel.deepspeed_compat.launcher``, listed with every other library patch in
``largelm.parallel.ALL_PATCHES``.

Exit codes and signal handling are DeepSpeed's: ``launch`` installs its SIGINT/SIGTERM handler (terminate the ranks,
wait up to 30 s, kill) and exits with the failing rank's code; the runner exits with ``launch``'s code.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from deepspeed.launcher import launch, runner

from largelm.cli import exit_now
from largelm.parallel.deepspeed_compat.launcher import (
    LocalLaunch,
    continue_stopped_ranks,
    fast_launch_poll,
    local_launch_in_process,
)


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
    if env is not None and env != dict(os.environ):
        os.environ.clear()
        os.environ.update(env)
    sys.argv = [launch.__file__, *argv]
    try:
        with fast_launch_poll(), continue_stopped_ranks():
            launch.main()
    except SystemExit as stop:
        return _code(stop)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The deepspeed runner on ``argv`` (its command line, e.g. ``--num_gpus=2 --module m ...``); its exit code."""
    try:
        with local_launch_in_process():
            runner.main(list(sys.argv[1:] if argv is None else argv))
        return 0
    except LocalLaunch as caught:
        local = caught
    except SystemExit as stop:
        return _code(stop)
    return run_launch(local.cmd[4:], local.env)  # outside the handler: its errors are not "during handling"


if __name__ == "__main__":
    exit_now(main())

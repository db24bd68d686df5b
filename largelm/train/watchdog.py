"""A rank that stops making progress ends itself, loudly, so the job ends on every host and can be requeued.

A peer that died is noticed by gloo/NCCL within seconds (a broken connection). A peer that is *frozen* (SIGSTOP, a
hung driver, swap death) or cut off (a network partition) is not: TCP connections stay "established", the other
ranks wait inside a collective without a word - for ``parallel.timeout_s``, which torch does not even enforce for
every gloo operation. The watchdog is a thread per rank that the trainer tells about progress (``beat`` after each
step and validation batch; ``busy(...)`` around checkpoint saves, which are progress for up to
``checkpoint.save_timeout_s``: a save also waits in collectives, and a peer cut off mid-save must not hang it). If
no beat comes for ``train.hang_timeout_s`` it prints what the rank was doing and every thread's Python stack
(``faulthandler``) to stderr and exits the process with ``EXIT_LOST_PEER``: the launcher then ends the other ranks
on this host, their collectives fail on the other hosts, and the job script requeues (a resume from the last
checkpoint loses at most ``checkpoint.save_interval`` steps).

A stop request (SIGTERM/SIGUSR1: preemption) normally lets the trainer finish its step and checkpoint. A rank
blocked in a collective or still starting cannot; after a stop request the watchdog ends it once it has made no
progress for ``STOP_GRACE_S`` (or three times its median step, if longer), instead of waiting for the launcher's
SIGKILL. A second signal falls back to the signal's default action at once (``largelm.train.main.StopFlag``).
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

# Exit code of a rank that gave up on a lost or hung peer: resumable from the last checkpoint, so the job script
# requeues it like a preemption (42, checkpointed on request), counted against the same requeue limit.
EXIT_LOST_PEER = 43
STOP_GRACE_S = 10.0
LOST_PEER_GRACE_S = 5.0  # a rank that lost a peer waits this long before exiting 43 (largelm/train/main.py)
_POLL_S = 0.5


# What a collective raises when the other end is gone (gloo: "Connection reset by peer", "Connection closed by
# peer"; NCCL: "remote process exited"; torch's store: "Broken pipe").
_LOST_PEER_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
                    "NCCL communicator was aborted", "Socket Timeout")


def is_lost_peer(err: BaseException) -> bool:
    """Did a collective fail because another rank went away (as opposed to a bug in this one)?"""
    text = str(err)
    return isinstance(err, (RuntimeError, ConnectionError)) and any(sign in text for sign in _LOST_PEER_SIGNS)


class Watchdog:
    def __init__(self, rank: int, hang_timeout_s: Optional[float]):
        self.rank = rank
        self.hang_timeout_s = hang_timeout_s or None  # 0/None: no hang detection (stop requests still handled)
        self.what = "starting up"
        self._last = time.monotonic()
        self._busy = 0  # inside busy(): no hang timeout, only the busy limit (if any)
        self._busy_limit_s: Optional[float] = None
        self._finishing = 0  # inside busy(..., finish_on_stop=True): a stop request waits for it too
        self._stop_requested_at: Optional[float] = None
        self._step_times: list[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="largelm-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def close(self) -> None:
        self._done.set()

    def beat(self, what: str, step_seconds: Optional[float] = None) -> None:
        """Progress: ``what`` the rank does next (named if it hangs there)."""
        self._last = time.monotonic()
        self.what = what
        if step_seconds is not None:
            self._step_times = (self._step_times + [step_seconds])[-50:]

    @contextmanager
    def busy(self, what: str, finish_on_stop: bool = True, limit_s: Optional[float] = None) -> Iterator[None]:
        """Long work that is progress: the hang timeout does not apply inside, ``limit_s`` (None: no bound) does,
        counted from the start or the last ``beat``. ``finish_on_stop``: a stop request waits for it (a checkpoint
        save); else a stop request may end the rank inside (start-up). Not nested."""
        self._busy += 1
        self._finishing += finish_on_stop
        self._busy_limit_s = limit_s or None
        previous, self.what = self.what, what
        self._last = time.monotonic()
        try:
            yield
        finally:
            self._busy -= 1
            self._finishing -= finish_on_stop
            self._busy_limit_s = None
            self.beat(f"after {what} (next: {previous})")

    def stop_requested(self) -> None:
        """Called from the signal handler: from now on, no progress for a short grace ends the rank."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()

    def _stop_grace(self) -> float:
        if not self._step_times:
            return 0.0  # no step yet (starting up, in rendezvous): nothing to finish or save
        return max(STOP_GRACE_S, 3 * statistics.median(self._step_times))

    def _watch(self) -> None:
        while not self._done.wait(_POLL_S):
            idle = time.monotonic() - self._last
            if self._stop_requested_at is not None and not self._finishing:
                since_stop = time.monotonic() - max(self._stop_requested_at, self._last)
                if since_stop >= self._stop_grace():
                    self._give_up(f"stop requested and no progress for {idle:.0f} s while {self.what} (blocked in "
                                  "a collective or still starting): exiting without a checkpoint")
            elif not self._busy and self.hang_timeout_s and idle >= self.hang_timeout_s:
                self._give_up(f"no progress for {idle:.0f} s (train.hang_timeout_s={self.hang_timeout_s:g}) while "
                              f"{self.what}: a peer rank is probably frozen or cut off")
            elif self._busy and self._busy_limit_s and idle >= self._busy_limit_s:
                self._give_up(f"no progress for {idle:.0f} s (limit {self._busy_limit_s:g} s) while {self.what}: a "
                              "peer rank is probably frozen or cut off, or the storage stalled")

    def _give_up(self, why: str) -> None:
        print(f"error (rank {self.rank}): {why}; Python stacks of every thread follow; exit {EXIT_LOST_PEER} "
              "(resume from the last checkpoint)", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_LOST_PEER)  # the main thread is blocked in a collective: nothing else can end it

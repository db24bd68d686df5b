"""Per-rank training entry point (what the deepspeed launcher / torchrun start on every rank).

    deepspeed --num_gpus 2 -m largelm.train.main --config configs/gpt-tiny.yaml   (or: largelm-launch ...)

Everything that can be checked without a process group is checked first (config, world size vs layout,
tokenizer, data manifests, checkpoint compatibility), so a bad run fails in seconds with a message naming the
file or field, before any rank waits on a collective.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from largelm.config import ConfigError, load_config
from largelm.train.preflight import preflight

# Exit code after a requested stop (SIGUSR1/SIGTERM) with a checkpoint written: the Slurm script requeues on it.
EXIT_PREEMPTED = 42
# Exit code of a run that stopped on a fault it detected (bad data, failed/unsafe checkpoint, too many NaN steps).
EXIT_FAILED = 1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 parallel.zero_stage=3")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class StopFlag:
    """Set by SIGUSR1/SIGTERM; the trainer finishes its step, checkpoints and exits. The watchdog (if given) ends a
    rank that cannot get there (blocked in a collective, still starting). A second SIGTERM takes its default action
    at once; SIGUSR1 may repeat (the job script re-sends it until the ranks exit) and is then ignored."""

    def __init__(self, watchdog=None):
        self.signal = None
        self.watchdog = watchdog
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        if signum == signal.SIGTERM and self.signal == signal.SIGTERM:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signum
        if self.watchdog is not None:
            self.watchdog.stop_requested()

    def __call__(self) -> bool:
        return self.signal is not None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cfg = preflight(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as err:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank fails the same way; say it once
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2

    # lazy: heavy imports (torch, deepspeed, megatron) only after the config is known to be good.
    from largelm.checkpoint.lock import CheckpointDirLock, CheckpointLocked  # lazy (see above)
    from largelm.checkpoint.manager import CheckpointError  # lazy (see above)
    from largelm.data import DataError  # lazy (see above)
    from largelm.model.registry import get_arch  # lazy (see above)
    from largelm.train.trainer import Trainer, TrainingAborted  # lazy (see above)
    from largelm.train.watchdog import EXIT_LOST_PEER, LOST_PEER_GRACE_S, Watchdog, is_lost_peer  # lazy (see above)

    rank = int(os.environ.get("RANK", "0"))
    try:  # the registered architectures are known once the model code is imported: still before any process group
        get_arch(cfg.model.arch)
    except ConfigError as err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    lock = CheckpointDirLock(cfg.checkpoint.dir)
    try:  # rank 0 holds checkpoint.dir for the run's life, taken before any process group (largelm.checkpoint.lock)
        if rank == 0:
            lock.acquire()
    except CheckpointLocked as err:  # the other ranks stop with the launcher, which ends them when rank 0 exits
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    # From here on every way out passes the finally below, which stops the watchdog (it ends the process on a hang).
    watchdog = Watchdog(rank, cfg.train.hang_timeout_s).start()
    stop = StopFlag(watchdog)
    trainer = None
    try:
        with watchdog.busy("starting up (process groups, model, engine, checkpoint)", finish_on_stop=False):
            trainer = Trainer(cfg, stop_requested=_all_ranks(stop), watchdog=watchdog)
        trainer.fit()
    except TrainingAborted as err:  # decided on every rank together: say it once
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # failing now: the launcher's SIGTERM must not wait
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except ConfigError as err:  # found once every rank was up (ranks disagree on precision): same on every rank
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except (CheckpointError, DataError) as err:  # messages name the file/shard/sample; no traceback needed
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print(f"error (rank {rank}): {_message(err)}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except BaseException as err:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # failing now: no checkpoint-on-SIGTERM
        if is_lost_peer(err):  # a peer rank died mid-collective: resumable, the job script requeues
            print(f"error (rank {rank}): lost a peer rank ({type(err).__name__}: {str(err).splitlines()[0]}); "
                  f"exit {EXIT_LOST_PEER} (resume from the last checkpoint)", file=sys.stderr, flush=True)
            # A peer that stopped on an error of its own (bad data: exit 1) closes its connections just before it
            # exits: give the launcher time to see that code first, so the job ends with the cause, not with 43.
            time.sleep(LOST_PEER_GRACE_S)
            return EXIT_LOST_PEER
        raise
    finally:
        watchdog.close()
        if trainer is not None:
            trainer.close()
        lock.release()
    # Done (checkpoint written): a late stop signal - e.g. the job script re-sending it - must not kill the process
    # while the interpreter shuts down, when Python has already put back the default (fatal) handlers.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Requeue only when the stop cut the run short; a run that reached train.steps is done.
    return EXIT_PREEMPTED if stop() and trainer.step < cfg.train.steps else 0


def _message(err: BaseException) -> str:
    """The error's own message; for one re-raised by a DataLoader worker, without the worker's tracebacks."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    name = f"{type(err).__module__}.{type(err).__name__}: "
    lines = [line[len(name):] for line in text.splitlines() if line.startswith(name)]
    return f"{lines[0]} (in a DataLoader worker)" if lines else text


def _all_ranks(stop: StopFlag):
    """A stop request seen by any rank stops every rank at the same step (else collectives would hang)."""
    import torch
    import torch.distributed as dist

    from largelm.parallel.groups import device  # lazy (heavy: torch)

    def requested() -> bool:
        flag = torch.tensor([1.0 if stop() else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and stop.signal is None:
            stop.signal = "peer"
        return bool(flag.item())

    return requested


if __name__ == "__main__":
    # Everything is closed by now (data workers, tensorboard, checkpoint files, process groups): leave without the
    # interpreter's teardown of torch/deepspeed/megatron, 1-3 s of CPU per rank (largelm.cli.exit_now). An exception
    # escaping main() still takes the normal way out, traceback included.
    from largelm.cli import exit_now

    exit_now(main())

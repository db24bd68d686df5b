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

from largelm.config import ConfigError, load_config
from largelm.train.preflight import preflight

# Exit code after a requested stop (SIGUSR1/SIGTERM) with a checkpoint written: the Slurm script requeues on it.
EXIT_PREEMPTED = 42


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 parallel.zero_stage=3")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class StopFlag:
    """Set by SIGUSR1/SIGTERM; the trainer finishes its step, checkpoints and exits."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        self.signal = signum

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

    from largelm.train.trainer import Trainer  # heavy imports only after the config is known to be good

    stop = StopFlag()
    trainer = Trainer(cfg, stop_requested=_all_ranks(stop))
    try:
        trainer.fit()
    finally:
        trainer.close()
    return EXIT_PREEMPTED if stop() else 0


def _all_ranks(stop: StopFlag):
    """A stop request seen by any rank stops every rank at the same step (else collectives would hang)."""
    import torch
    import torch.distributed as dist

    from largelm.parallel.groups import device

    def requested() -> bool:
        flag = torch.tensor([1.0 if stop() else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and stop.signal is None:
            stop.signal = "peer"
        return bool(flag.item())

    return requested


if __name__ == "__main__":
    sys.exit(main())

"""In-training downstream evaluation: lm-evaluation-harness on rank 0's model every ``eval.interval`` steps.

The config allows it only where rank 0 holds the whole model (tensor_parallel=1, pipeline_parallel=1, ZeRO stage
<= 2: config validation refuses the rest, naming the fields). Rank 0 runs the harness on ``engine.module`` (in
the run's precision, eval mode, under ``torch.no_grad``) through the same adapter as ``largelm-eval``
(largelm/model/harness.py); the other ranks wait at a barrier (gloo: a monitored barrier bounded by
``eval.timeout_s``; NCCL: bounded by ``parallel.timeout_s``). Every rank is inside ``watchdog.busy`` meanwhile,
like a checkpoint save: the evaluation is progress, bounded by ``eval.timeout_s``, not a hang. The harness
reseeds Python's, numpy's and torch's global RNGs; rank 0's RNG states are put back afterwards so the evaluation
leaves training (and its exact resume) unchanged.
"""

from __future__ import annotations

import datetime
import time
from typing import Optional

import torch
import torch.distributed as dist

from largelm.config import Config
from largelm.tokenizer import Tokenizer
from largelm.train.rng import capture_rng_state, restore_rng_state


class HarnessEval:
    def __init__(self, cfg: Config, rank: int):
        self.cfg = cfg
        self.rank = rank
        self.tokenizer = Tokenizer.load(cfg.tokenizer.model) if rank == 0 else None

    def due(self, step: int) -> bool:
        return self.cfg.eval is not None and step % self.cfg.eval.interval == 0

    def run(self, module: torch.nn.Module, step: int, watchdog) -> Optional[dict[str, float]]:
        """Collective: rank 0 returns ``eval/<task>/<metric>`` scalars, the other ranks None."""
        ev = self.cfg.eval
        metrics = None
        with watchdog.busy(f"lm-eval at step {step}", finish_on_stop=False, limit_s=ev.timeout_s):
            if self.rank == 0:
                from largelm.model.harness import LargelmLM, flat_metrics, run_harness  # lazy (slow; rank 0 only)

                began = time.perf_counter()
                rng = capture_rng_state()
                try:
                    lm = LargelmLM(module, self.tokenizer, max_length=self.cfg.model.seq_length,
                                   batch_size=ev.batch_size)
                    results = run_harness(lm, ev.tasks, ev.task_dir, limit=ev.limit, bootstrap_iters=0, quiet=True)
                finally:
                    restore_rng_state(rng)
                metrics = flat_metrics(results)
                metrics["eval/seconds"] = time.perf_counter() - began
            if dist.get_world_size() > 1:
                if dist.get_backend() == "gloo":  # a barrier with its own timeout (gloo only)
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=ev.timeout_s), wait_all_ranks=True)
                else:  # NCCL: bounded by parallel.timeout_s
                    dist.barrier()
        return metrics

    def run_and_log(self, module: torch.nn.Module, step: int, watchdog, log) -> None:
        """``run``, then rank 0 logs the scalars (tensorboard, W&B) and one line (``log``: the trainer's RunLogger)."""
        metrics = self.run(module, step, watchdog)
        if metrics:
            log.scalars(step, metrics)
            log.line(f"lm-eval at step {step}:" + "".join(f" {k[len('eval/'):]} {v:.4f}" for k, v in metrics.items()))

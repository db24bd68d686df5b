"""In-training downstream evaluation: lm-evaluation-harness every ``eval.interval`` steps, on any layout.

Rank 0 drives lm-eval through the same adapter as ``largelm-eval`` (largelm/model/harness.py), in the run's
precision, eval mode, under ``torch.no_grad``. How the model's forward runs depends on where the weights are:

* rank 0 holds the whole model (tensor_parallel=1, pipeline_parallel=1, ZeRO stage <= 2): rank 0 runs the harness
  on ``engine.module`` alone (KV-cache generation); the other ranks wait at a barrier (gloo: a monitored barrier
  bounded by ``eval.timeout_s``; NCCL: bounded by ``parallel.timeout_s``).
* otherwise (TP > 1, PP > 1 or ZeRO-3) every model forward is a collective over all ranks (``CollectiveForward``):
  rank 0 broadcasts a command (forward or done) with the batch's shape, then the token ids; every rank runs its part
  (``largelm.model.parallel_forward.layout_forward``: TP ranks gather the vocabulary-parallel logits, pipeline
  stages pass hidden states point to point, and under ZeRO-3 the engine's forward gathers the partitioned
  parameters, which needs every data-parallel rank); the holder of the last stage in rank 0's pipeline sends the
  log-probabilities to rank 0. Other data-parallel replicas run the same forwards (they would only wait
  otherwise). A final "done" (or "failed", when rank 0's harness raised: then every rank raises) releases them.
  Between two forwards the other ranks wait in a broadcast, bounded by ``parallel.timeout_s``. Generation runs
  without a KV cache there (each new token is one collective forward of the window).

Every rank is inside ``watchdog.busy`` meanwhile, like a checkpoint save: the evaluation is progress, bounded by
``eval.timeout_s``, not a hang. The harness reseeds Python's, numpy's and torch's global RNGs; every rank's RNG
states are put back afterwards, so the evaluation leaves training (and its exact resume) unchanged.
"""

from __future__ import annotations

import datetime
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed import DeepSpeedEngine
from megatron.core import parallel_state

from largelm.config import Config
from largelm.model.parallel_forward import layout_forward
from largelm.parallel import groups
from largelm.tokenizer import Tokenizer
from largelm.train.rng import capture_rng_state, restore_rng_state

FORWARD, DONE, FAILED = 1, 0, -1  # CollectiveForward's commands


def needs_collective(cfg: Config) -> bool:
    """Whether no single rank holds the whole model (TP/PP shards, or ZeRO-3 partitions)."""
    return cfg.parallel.model_parallel > 1 or cfg.parallel.zero_stage == 3


class CollectiveForward:
    """A model forward as a collective over every rank; rank 0 calls it (``__call__``, the adapter's
    ``forward_logprobs``), the others ``serve`` until rank 0 calls ``finish``. ``module``: the DeepSpeed engine of a
    dense model (any ZeRO stage) or this rank's pipeline stage (``engine.module`` of a PipelineEngine)."""

    def __init__(self, module: torch.nn.Module, cfg: Config, vocab_size: int):
        self.module = module
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.device = groups.device()
        self.tp = cfg.parallel.tensor_parallel
        # the last stage of rank 0's pipeline (rank 0 itself without pipeline parallelism) computes the log-probs
        self.holder = dist.get_rank() == parallel_state.get_pipeline_model_parallel_last_rank() and \
            parallel_state.get_pipeline_model_parallel_first_rank() == 0 and \
            parallel_state.get_tensor_model_parallel_rank() == 0

    def _command(self, command: int = 0, batch: int = 0, width: int = 0) -> tuple[int, int, int]:
        header = torch.tensor([command, batch, width], dtype=torch.long, device=self.device)
        dist.broadcast(header, src=0)
        return tuple(int(v) for v in header.tolist())

    def _forward(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """Every rank: this rank's part of the forward of ``tokens`` [b, w]; rank 0 gets the log-probs [b, w, V]."""
        dist.broadcast(tokens, src=0)
        width = tokens.shape[1]
        if self.cfg.parallel.sequence_parallel and width % self.tp:  # activations split along the sequence
            pad = tokens.new_zeros(tokens.shape[0], self.tp - width % self.tp)
            tokens = torch.cat([tokens, pad], dim=1)  # right padding: causal attention keeps it from real positions
        logits = layout_forward(self.module, tokens, self.cfg.model,
                                sequence_parallel=self.cfg.parallel.sequence_parallel)
        logprobs = None
        if self.holder:
            logprobs = F.log_softmax(logits[:, :width, :self.vocab_size].float(), dim=-1).contiguous()
            if dist.get_rank() != 0:
                dist.send(logprobs, dst=0)
        elif dist.get_rank() == 0:
            logprobs = torch.empty(tokens.shape[0], width, self.vocab_size, device=self.device)
            dist.recv(logprobs, src=parallel_state.get_pipeline_model_parallel_last_rank())
        return logprobs

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rank 0: fp32 log-probabilities [b, w, vocab] (CPU) of ``tokens`` [b, w]."""
        self._command(FORWARD, *tokens.shape)
        return self._forward(tokens.to(self.device, torch.long)).cpu()

    def serve(self) -> None:
        """Every rank but 0: run forwards until rank 0 says done; raise if rank 0's harness failed."""
        while True:
            command, batch, width = self._command()
            if command == DONE:
                return
            if command == FAILED:
                raise RuntimeError("lm-eval failed on rank 0 (its error is in rank 0's log)")
            self._forward(torch.empty(batch, width, dtype=torch.long, device=self.device))

    def finish(self, failed: bool) -> None:
        """Rank 0: release the other ranks."""
        self._command(FAILED if failed else DONE)


class HarnessEval:
    def __init__(self, cfg: Config, rank: int):
        self.cfg = cfg
        self.rank = rank
        self.tokenizer = Tokenizer.load(cfg.tokenizer.model) if rank == 0 else None

    def due(self, step: int) -> bool:
        return self.cfg.eval is not None and step % self.cfg.eval.interval == 0

    def _harness(self, model: Optional[torch.nn.Module], forward=None) -> dict[str, float]:
        """Rank 0: lm-eval's metrics of ``model`` (or of ``forward``), flattened."""
        from largelm.model.harness import LargelmLM, flat_metrics, run_harness  # lazy (slow; rank 0 only)

        ev = self.cfg.eval
        began = time.perf_counter()
        lm = LargelmLM(model, self.tokenizer, max_length=self.cfg.model.seq_length, batch_size=ev.batch_size,
                       forward_logprobs=forward)
        metrics = flat_metrics(run_harness(lm, ev.tasks, ev.task_dir, limit=ev.limit, bootstrap_iters=0,
                                           quiet=True))
        metrics["eval/seconds"] = time.perf_counter() - began
        return metrics

    def _collective(self, engine: torch.nn.Module) -> Optional[dict[str, float]]:
        """Every rank: the harness on rank 0 with every forward a collective (``CollectiveForward``)."""
        pipeline = self.cfg.parallel.pipeline_parallel > 1
        module = engine.module if pipeline else engine  # a PipelineEngine only runs schedules: call its stage
        forward = CollectiveForward(module, self.cfg, self.cfg.model.vocab_size)
        was_training = module.training
        module.eval()
        try:
            if self.rank != 0:
                forward.serve()
                return None
            failed = True
            try:
                metrics = self._harness(None, forward)
                failed = False
            finally:
                forward.finish(failed)
            return metrics
        finally:
            module.train(was_training)

    def run(self, engine: torch.nn.Module, step: int, watchdog) -> Optional[dict[str, float]]:
        """Collective: rank 0 returns ``eval/<task>/<metric>`` scalars, the other ranks None. ``engine``: the
        trainer's DeepSpeed engine (or, with the whole model on every rank, the model itself)."""
        ev = self.cfg.eval
        metrics = None
        with watchdog.busy(f"lm-eval at step {step}", finish_on_stop=False, limit_s=ev.timeout_s):
            rng = capture_rng_state()
            try:
                if needs_collective(self.cfg):
                    return self._collective(engine)
                if self.rank == 0:
                    metrics = self._harness(engine.module if isinstance(engine, DeepSpeedEngine) else engine)
            finally:
                restore_rng_state(rng)
            if dist.get_world_size() > 1:
                if dist.get_backend() == "gloo":  # a barrier with its own timeout (gloo only)
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=ev.timeout_s), wait_all_ranks=True)
                else:  # NCCL: bounded by parallel.timeout_s
                    dist.barrier()
        return metrics

    def run_and_log(self, engine: torch.nn.Module, step: int, watchdog, log) -> None:
        """``run``, then rank 0 logs the scalars (tensorboard, W&B) and one line (``log``: the trainer's RunLogger)."""
        metrics = self.run(engine, step, watchdog)
        if metrics:
            log.scalars(step, metrics)
            log.line(f"lm-eval at step {step}:" + "".join(f" {k[len('eval/'):]} {v:.4f}" for k, v in metrics.items()))

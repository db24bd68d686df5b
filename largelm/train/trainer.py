"""The training loop: one DeepSpeed engine owns the optimizer step; megatron-core owns the model.

Per optimizer step each rank runs ``grad_accum_steps`` micro-batches through ``engine.forward/backward/step``
(DeepSpeed steps the optimizer, clips and zeroes gradients at the accumulation boundary and steps our LR
scheduler), then logs, validates and checkpoints on schedule.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from largelm.checkpoint.manager import CheckpointManager, find_latest
from largelm.config import Config, dump_config
from largelm.data import build_loader
from largelm.model.gpt import flops_per_token
from largelm.parallel import groups
from largelm.parallel.cpu_compat import enable_cpu_compat, model_parallel_manual_seed
from largelm.train.logger import RunLogger
from largelm.train.metrics import Throughput, measure_matmul_peak_flops, memory_stats
from largelm.train.rng import capture_rng_state, restore_rng_state
from largelm.train.engine import build_step, model_dtype


class TrainingAborted(RuntimeError):
    """Training cannot continue (e.g. too many consecutive non-finite steps)."""


class Trainer:
    def __init__(self, cfg: Config, stop_requested=None):
        self.cfg = cfg
        # ``stop_requested()`` is polled after each step (preemption signals); True -> checkpoint and stop.
        self.stop_requested = stop_requested or (lambda: False)
        groups.init_distributed(cfg.parallel.backend)
        enable_cpu_compat()
        groups.init_model_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                                   cfg.parallel.virtual_pipeline)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.device = groups.device()
        torch.manual_seed(cfg.train.seed)
        model_parallel_manual_seed(cfg.train.seed)

        self.stepper = build_step(cfg, self.world_size)
        self.engine = self.stepper.engine
        self.ckpt = CheckpointManager(
            cfg.checkpoint.dir, keep_last=cfg.checkpoint.keep_last, config_yaml=dump_config(cfg),
            meta={"world_size": self.world_size, "tensor_parallel": cfg.parallel.tensor_parallel,
                  "pipeline_parallel": cfg.parallel.pipeline_parallel, "zero_stage": cfg.parallel.zero_stage},
        )
        self.step = 0
        self.loader = self._train_loader()
        self._restore()

        peak = cfg.logging.peak_tflops_per_rank
        peak_flops = peak * 1e12 if peak else measure_matmul_peak_flops(model_dtype(cfg))
        self.throughput = Throughput(cfg.tokens_per_step(self.world_size), flops_per_token(cfg.model),
                                     peak_flops * self.world_size)
        self.log = RunLogger(self.rank == 0, cfg.train.steps, self.step, cfg.logging.tensorboard_dir,
                             cfg.logging.progress_bar)
        self.history: list[tuple[int, float]] = []

    # --- data ---------------------------------------------------------------------------------------
    def _train_loader(self):
        d = self.cfg.data
        return build_loader(
            datasets=[(spec.path, spec.weight) for spec in d.train], seq_length=self.cfg.model.seq_length,
            batch_size=self.cfg.train.micro_batch_size, rank=self.dp_rank, world_size=self.dp_size,
            num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer, seed=d.seed, infinite=True,
            skip_bad_samples=d.skip_bad_samples,
        )

    def _valid_loader(self):
        d = self.cfg.data
        return build_loader(
            datasets=[(spec.path, spec.weight) for spec in d.valid], seq_length=self.cfg.model.seq_length,
            batch_size=self.cfg.train.micro_batch_size, rank=self.dp_rank, world_size=self.dp_size,
            num_workers=0, shuffle_buffer=0, seed=d.seed, infinite=False, skip_bad_samples=d.skip_bad_samples,
        )

    # --- checkpoints --------------------------------------------------------------------------------
    def _restore(self) -> None:
        if not self.cfg.checkpoint.resume:
            return
        latest = find_latest(Path(self.cfg.checkpoint.dir)) if self.rank == 0 else None
        obj = [latest]
        dist.broadcast_object_list(obj, src=0)  # every rank loads the checkpoint rank 0 verified
        latest = obj[0]
        if latest is None:
            return
        state = self.ckpt.load(self.engine, latest)
        self.step = state["step"]
        self.loader.load_state_dict(state["data"])
        restore_rng_state(state["rng"])
        if self.rank == 0:
            print(f"resumed from {latest.path} at step {self.step}", flush=True)

    def save(self) -> Path:
        state = {"step": self.step, "data": self.loader.state_dict(), "rng": capture_rng_state()}
        path = self.ckpt.save(self.engine, self.step, state)
        self.log.line(f"saved checkpoint {path}")
        return path

    # --- steps --------------------------------------------------------------------------------------
    def _dp_mean(self, value: torch.Tensor) -> float:
        value = value.detach().float().to(self.device)
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
        return value.item() / self.dp_size

    def train_step(self, batches) -> float:
        return self._dp_mean(self.stepper.train_step(batches))

    @torch.no_grad()
    def evaluate(self) -> Optional[dict[str, float]]:
        if not self.cfg.data.valid:
            return None
        total, count = torch.zeros((), device=self.device), 0
        for i, batch in enumerate(self._valid_loader()):
            if i >= self.cfg.train.eval_steps:
                break
            total += self.stepper.eval_loss(batch)
            count += 1
        if count == 0:
            raise RuntimeError(f"validation data {[s.path for s in self.cfg.data.valid]} yielded no batch on "
                               f"data-parallel rank {self.dp_rank}")
        loss = self._dp_mean(total / count)
        return {"valid/loss": loss, "valid/ppl": math.exp(min(loss, 50.0))}

    def fit(self) -> list[tuple[int, float]]:
        cfg = self.cfg.train
        batches = iter(self.loader)
        bad_steps = 0
        start = time.perf_counter()
        last_step = cfg.steps if not cfg.exit_interval else min(cfg.steps, self.step + cfg.exit_interval)
        while self.step < last_step:
            loss = self.train_step(batches)
            self.step += 1
            self.throughput.step()
            if not math.isfinite(loss):
                bad_steps += 1
                self.log.line(f"step {self.step}: non-finite loss {loss} ({bad_steps} in a row)")
                if bad_steps >= cfg.max_bad_steps:
                    raise TrainingAborted(f"{bad_steps} consecutive non-finite losses (train.max_bad_steps)")
            else:
                bad_steps = 0
            self.history.append((self.step, loss))
            self._log_step(loss)
            if cfg.eval_interval and self.step % cfg.eval_interval == 0:
                self._log_eval()
            interval = self.cfg.checkpoint.save_interval
            stop = self.stop_requested()
            if (interval and self.step % interval == 0) or self.step == last_step or stop:
                self.save()
            if stop:
                self.log.line(f"stopping at step {self.step} on request (checkpoint written)")
                break
        self.log.line(f"done: {self.step} steps in {time.perf_counter() - start:.1f}s")
        self.log.close()
        return self.history

    def _log_step(self, loss: float) -> None:
        cfg = self.cfg.train
        lr = self.engine.get_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "data/bad_samples": float(self.loader.bad_samples)}
        tps = None
        if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
            perf = self.throughput.report()
            tps = perf["perf/tokens_per_s"]
            scalars.update(perf)
            scalars.update(memory_stats())
            eta = (cfg.steps - self.step) * perf["perf/step_time_s"]
            self.log.line(f"step {self.step}/{cfg.steps} loss {loss:.4f} lr {lr:.3e} grad_norm {grad_norm:.3f} "
                          f"tokens/s {tps:,.0f} mfu {perf['perf/mfu']:.1%} eta {eta:.0f}s")
        self.log.scalars(self.step, scalars)
        self.log.step(loss, tps)

    def _log_eval(self) -> None:
        metrics = self.evaluate()
        if metrics:
            self.log.scalars(self.step, metrics)
            self.log.line(f"step {self.step} valid loss {metrics['valid/loss']:.4f} ppl {metrics['valid/ppl']:.2f}")

    def close(self) -> None:
        groups.destroy()

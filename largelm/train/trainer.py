"""The training loop: one DeepSpeed engine owns the optimizer step; megatron-core owns the model.

Per optimizer step each rank runs ``grad_accum_steps`` micro-batches through ``engine.forward/backward/step``
(DeepSpeed steps the optimizer, clips and zeroes gradients at the accumulation boundary and steps our LR
scheduler), then logs, validates and checkpoints on schedule.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from largelm import faults
from largelm.checkpoint import elastic
from largelm.checkpoint.full_weights import checkpoint_config
from largelm.checkpoint.layout_change import RESHARD_SETTING, layout_change
from largelm.checkpoint.manager import (
    LATEST,
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    find_latest,
    read_manifest,
    set_aside_newer,
)
from largelm.checkpoint.reader import load_pt
from largelm.config import Config, ConfigError, dump_config
from largelm.data import DataError, build_loader, remote_settings
from largelm.errors import ConversionError
from largelm.fileio import sha256_file
from largelm.hardware import choose_precision, detect_device, model_dtype, run_precision
from largelm.model.flops import matmul_shapes
from largelm.model.registry import get_arch
from largelm.parallel import groups
from largelm.parallel.cpu_compat import enable_cpu_compat, model_parallel_manual_seed
from largelm.train import data_position
from largelm.train.guards import StepGuard
from largelm.train.logger import RunLogger
from largelm.train.metrics import Throughput, matmul_flops, memory_stats, products_seconds
from largelm.train.preflight import precision_choice
from largelm.train.rng import capture_rng_state, restore_rng_state
from largelm.train.step import build_step
from largelm.train.wandb_log import WandbMirror
from largelm.train.watchdog import Watchdog


def check_ranks_agree_on_precision(precision: str) -> None:
    """Every rank resolved ``train.precision`` on its own device (preflight): a mixed allocation (nodes of two CPU
    kinds under ``auto``) would train one model in two precisions. A collective: refuse it on every rank, naming
    each rank's choice and device."""
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, (precision, detect_device().describe()))
    if len({chosen for chosen, _ in every}) > 1:
        lines = "\n  ".join(f"rank {r}: {chosen} on {device}" for r, (chosen, device) in enumerate(every))
        raise ConfigError(f"train.precision: the ranks chose different precisions on their devices (set it to fp32 "
                          f"or bf16 explicitly):\n  {lines}")


class TrainingAborted(RuntimeError):
    """Training cannot continue (e.g. too many consecutive non-finite steps)."""


class Trainer:
    def __init__(self, cfg: Config, stop_requested=None, watchdog: Optional[Watchdog] = None):
        self.cfg = cfg
        # ``stop_requested()`` is polled after each step (preemption signals); True -> checkpoint and stop.
        self.stop_requested = stop_requested or (lambda: False)
        # Told about every finished step, validation batch and checkpoint save (largelm/train/watchdog.py).
        self.watchdog = watchdog or Watchdog(0, hang_timeout_s=None)
        groups.init_distributed(cfg.parallel.backend, timeout_s=cfg.parallel.timeout_s)
        enable_cpu_compat()
        groups.init_model_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                                   cfg.parallel.virtual_pipeline, expert_parallel=cfg.parallel.expert_parallel)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.device = groups.device()
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)  # Python and numpy too: they start from OS entropy, so a fresh run would
        np.random.seed(cfg.train.seed % 2**32)  # not reproduce another's RNG state (checkpointed in rng.py)
        model_parallel_manual_seed(cfg.train.seed)

        # ``auto`` is left only without preflight (a test, a tool): resolve it by the fresh-run rule
        cfg.train.precision = run_precision(cfg)
        check_ranks_agree_on_precision(cfg.train.precision)
        resume = self._find_resume()
        # A checkpoint of another layout is resharded: the engine is built from its full weights (as a fresh run
        # would be), then given its optimizer state (largelm/checkpoint/elastic.py).
        self.reshard = self._reshard_source(resume)
        init = elastic.init_weights(self.reshard, cfg) if self.reshard else None
        self.stepper = build_step(cfg, self.world_size, init_state_dict=init)
        self.engine = self.stepper.engine
        self.guard = StepGuard(cfg.train.max_bad_steps, cfg.train.loss_spike_factor)
        self.faults = faults.ModelFaults(self.engine.module)  # test hook: inert unless LARGELM_FAULTS is set
        self.ckpt = CheckpointManager(
            cfg.checkpoint.dir, keep_last=cfg.checkpoint.keep_last, config_yaml=dump_config(cfg),
            meta={"world_size": self.world_size, "tensor_parallel": cfg.parallel.tensor_parallel,
                  "pipeline_parallel": cfg.parallel.pipeline_parallel, "zero_stage": cfg.parallel.zero_stage,
                  "precision": cfg.train.precision,  # as computed (``auto`` resolved), also in config.yaml
                  # which token ids the weights mean, independent of where the file is later (distill's check)
                  "tokenizer_sha256": sha256_file(cfg.tokenizer.model)},
        )
        self.step = 0
        self.loader = self._train_loader()
        self._restore(resume)
        self.reshard = None  # the full state read for resharding is not kept for the run

        peak_flops = self._peak_flops_and_precision_note()
        arch = get_arch(cfg.model.arch)
        flops = arch.flops_per_token(cfg.model, arch.section(cfg))
        self.throughput = Throughput(cfg.tokens_per_step(self.world_size), flops, peak_flops * self.world_size)
        wandb = WandbMirror(cfg, resumed=resume is not None) if self.rank == 0 and cfg.logging.wandb else None
        self.log = RunLogger(self.rank == 0, cfg.train.steps, self.step, cfg.logging.tensorboard_dir,
                             cfg.logging.progress_bar, wandb)
        self.harness = None
        if cfg.eval is not None:  # lm-evaluation-harness (eval: section)
            from largelm.train.harness_eval import HarnessEval  # lazy (lm-eval + datasets: seconds to import)

            self.harness = HarnessEval(cfg, self.rank)
        self.history: list[tuple[int, float]] = []
        self._short_eval_noted = False  # said once that validation runs fewer than train.eval_steps batches

    # --- precision and MFU peak ------------------------------------------------------------------------
    def _peak_flops_and_precision_note(self) -> float:
        """Per-rank MFU denominator (datasheet ``logging.peak_tflops_per_rank``, else measured on the model's own
        products in its dtype) and rank 0's precision line: what was chosen and why, and, for bf16 on a device
        that emulates it, how much slower than fp32 it is here (measured now, on the same products)."""
        cfg, dtype = self.cfg, model_dtype(self.cfg)
        choice = precision_choice(cfg) or choose_precision(cfg.train.precision, detect_device())
        shapes = matmul_shapes(cfg.model, cfg.train.micro_batch_size * cfg.model.seq_length,
                               cfg.parallel.tensor_parallel)
        configured = cfg.logging.peak_tflops_per_rank
        rates = matmul_flops(shapes, dtype) if not configured or choice.slow_bf16 else {}
        peak = configured * 1e12 if configured else max(rates.values())
        note = f"precision: {choice.reason}"
        if choice.slow_bf16:
            slower = products_seconds(rates) / products_seconds(matmul_flops(shapes, torch.float32))
            note += (f"\nwarning: bf16 is not native on this device: the model's matrix products take {slower:,.1f}x "
                     f"as long in bf16 as in fp32 here (measured at start-up); train.precision=auto would use fp32")
        if self.rank == 0:
            print(note, flush=True)
        return peak

    # --- data ---------------------------------------------------------------------------------------
    def _train_loader(self):
        return build_run_loader(self.cfg, self.dp_rank, self.dp_size, train=True)

    def _valid_loader(self):
        return build_run_loader(self.cfg, self.dp_rank, self.dp_size, train=False)

    # --- checkpoints --------------------------------------------------------------------------------
    def _find_resume(self) -> Optional[Checkpoint]:
        """The checkpoint this run resumes (rank 0 verifies it; every rank loads that one), or None."""
        if not self.cfg.checkpoint.resume:
            return None
        latest = find_latest(Path(self.cfg.checkpoint.dir)) if self.rank == 0 else None
        if latest is not None:  # a later timeline is set aside before this run's first save could rotate into it
            set_aside_newer(Path(self.cfg.checkpoint.dir), latest)
        obj = [latest]
        dist.broadcast_object_list(obj, src=0)  # every rank loads the checkpoint rank 0 verified
        return obj[0]

    def _reshard_source(self, latest: Optional[Checkpoint]) -> Optional[elastic.ReshardSource]:
        """The checkpoint's full state when it was written in another parallel layout (None: same layout, the
        exact DeepSpeed load). Without ``checkpoint.reshard_on_resume`` such a resume is refused (preflight
        refuses it first, naming the change)."""
        if latest is None:
            return None
        written = checkpoint_config(latest.path)
        saved_world = read_manifest(latest.path).get("world_size", self.world_size)
        change = layout_change(written, saved_world, self.cfg, self.world_size)
        if change is None:
            return None
        if not self.cfg.checkpoint.reshard_on_resume:
            raise ConfigError(f"checkpoint {latest.path} was written in another parallel layout:\n  {change}\n"
                              f"resume it resharded with {RESHARD_SETTING}")
        if self.rank == 0:
            print(f"resuming {latest.path} in another layout:\n  {change}", flush=True)
        try:
            return elastic.read_reshard_source(latest.path)
        except ConversionError as err:
            raise CheckpointError(f"cannot reshard checkpoint {latest.path}: {err}") from None

    def _restore(self, latest: Optional[Checkpoint]) -> None:
        if latest is None:
            return
        if self.reshard is not None:
            state = self._load_resharded(self.reshard)
        else:
            state = self.ckpt.load(self.engine, latest)
            self.loader.load_state_dict(data_position.loader_state(self.loader, state["data"], self.rank,
                                                                   self.dp_size))
            restore_rng_state(state["rng"])
        self.step = state["step"]
        self.guard.load_state_dict(state.get("guard", {}))
        if self.rank == 0:
            print(f"resumed from {latest.path} at step {self.step}", flush=True)

    def _load_resharded(self, source: elastic.ReshardSource) -> dict:
        """Give the engine the checkpoint's state in this layout; returns the trainer state for this rank. RNG
        states are kept only where this rank has a counterpart at the same coordinates (same TP/PP/DP sizes: only
        the ZeRO stage changed); otherwise the fresh seeding of __init__ stands (said so)."""
        info = source.info
        elastic.load_into_engine(self.engine, self.cfg, source, parallel_state.get_tensor_model_parallel_rank(),
                                 parallel_state.get_expert_model_parallel_rank())
        first = load_pt(elastic.trainer_state_file(info, 0))
        # megatron's expert-parallel RNG stream is seeded per expert-parallel rank: an EP change moves it too
        same_ranks = (info.world_size == self.world_size and info.tensor_parallel == self.cfg.parallel.tensor_parallel
                      and info.pipeline_parallel == self.cfg.parallel.pipeline_parallel
                      and info.config.parallel.expert_parallel == self.cfg.parallel.expert_parallel)
        if same_ranks:
            restore_rng_state(load_pt(elastic.trainer_state_file(info, self.rank))["rng"])
        old_states = [load_pt(elastic.trainer_state_file(info, elastic.old_rank(info, d)))["data"]
                      for d in range(info.data_parallel)]
        position, note = data_position.resharded(old_states, self.loader, self.dp_rank, self.dp_size)
        self.loader.load_state_dict(position)
        if self.rank == 0:
            rng = "RNG states carried" if same_ranks else "RNG states freshly seeded (the rank coordinates changed)"
            print(f"resharded resume: {rng}; data position: {note}", flush=True)
        return {"step": info.step, "guard": first.get("guard", {})}

    def save(self) -> Path:
        state = {"step": self.step, "rng": capture_rng_state(),
                 "data": data_position.with_global_position(self.loader, self.dp_rank, self.dp_size),
                 "guard": self.guard.state_dict()}
        limit_s = self.cfg.checkpoint.save_timeout_s
        with self.watchdog.busy(f"saving the checkpoint of step {self.step}", limit_s=limit_s):
            path = self.ckpt.save(self.engine, self.step, state)
        self.log.line(f"saved checkpoint {path}")
        return path

    # --- steps --------------------------------------------------------------------------------------
    def _dp_mean(self, value: torch.Tensor) -> float:
        value = value.detach().float().to(self.device)
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
        return value.item() / self.dp_size

    def _on_every_dp_rank(self, flag: bool) -> bool:
        """Collective over the data-parallel group: is ``flag`` true on every rank?"""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=parallel_state.get_data_parallel_group())
        return bool(value.item())

    def train_step(self, batches) -> float:
        loss = self._dp_mean(self.stepper.train_step(batches))
        # Extra scalars a step driver exposes for its last step (e.g. distillation's loss parts), averaged over
        # data-parallel ranks (every rank runs this, so the collectives match); logged by _log_step.
        extra = getattr(self.stepper, "last_metrics", None) or {}
        self.step_metrics = {k: self._dp_mean(torch.tensor(float(v))) for k, v in sorted(extra.items())}
        return loss

    @torch.no_grad()
    def evaluate(self) -> Optional[dict[str, float]]:
        if not self.cfg.data.valid:
            return None
        total, count = torch.zeros((), device=self.device), 0
        extra: dict[str, float] = {}  # a step driver's per-batch validation metrics (``last_eval_metrics``)
        loader = self._valid_loader()
        batches, steps = iter(loader), self.cfg.train.eval_steps
        while count < steps:
            batch = next(batches, None)
            # The data-parallel ranks' shares of the validation data can differ by a batch (more with skipped bad
            # samples) and an eval forward can be collective (ZeRO-3): all stop at the first batch one rank lacks.
            if not self._on_every_dp_rank(batch is not None):
                break
            total += self.stepper.eval_loss(batch)
            self.watchdog.beat(f"validating (batch {count + 1})")
            for name, value in (getattr(self.stepper, "last_eval_metrics", None) or {}).items():
                extra[name] = extra.get(name, 0.0) + float(value)
            count += 1
        self.loader.add_retries(loader.retries)  # data/retries: the run's, carried in the train loader's state
        paths = [s.path for s in self.cfg.data.valid]
        if count == 0:
            raise DataError(f"validation data {paths} yielded no batch on some data-parallel rank (each of the "
                            f"{self.dp_size} ranks reads its own share: it needs at least {self.dp_size} samples)")
        if count < steps and not self._short_eval_noted:
            self._short_eval_noted = True
            self.log.line(f"validation runs {count} of train.eval_steps={steps} batches: the smallest "
                          f"data-parallel share of {paths} has only {count}")
        loss = self._dp_mean(total / count)
        metrics = {"valid/loss": loss}
        if get_arch(self.cfg.model.arch).causal_lm:  # perplexity of an LM loss (BERT's is MLM + SOP: not one)
            metrics["valid/ppl"] = math.exp(min(loss, 50.0))
        metrics.update({k: self._dp_mean(torch.tensor(v / count)) for k, v in sorted(extra.items())})
        return metrics

    def fit(self) -> list[tuple[int, float]]:
        cfg = self.cfg.train
        batches = iter(self.loader)
        start = time.perf_counter()
        last_step = cfg.steps if not cfg.exit_interval else min(cfg.steps, self.step + cfg.exit_interval)
        save_pending = completed = False
        try:
            while self.step < last_step:
                self.faults.before_step(self.step + 1)
                began = time.perf_counter()
                loss = self.train_step(batches)
                self.step += 1
                self.watchdog.beat(f"after step {self.step}", step_seconds=time.perf_counter() - began)
                self.throughput.step()
                # Non-finite loss/gradients on any rank: DeepSpeed did not apply the update (guards.py).
                verdict = self.guard.check(self.step, loss, self.engine.was_step_applied(),
                                           self.engine.get_global_grad_norm())
                if verdict.message:
                    self.log.line(verdict.message)
                self.history.append((self.step, loss))
                self._log_step(loss)
                if verdict.abort:
                    raise TrainingAborted(self.guard.abort_message(self.step, self._latest_checkpoint()))
                if cfg.eval_interval and self.step % cfg.eval_interval == 0:
                    self._log_eval()
                if self.harness is not None and self.harness.due(self.step):
                    self.harness.run_and_log(self.engine, self.step, self.watchdog, self.log)
                interval = self.cfg.checkpoint.save_interval
                stop = self.stop_requested()
                if (interval and self.step % interval == 0) or self.step == last_step or stop or save_pending:
                    # Never checkpoint right after a skipped step: if the parameters are what went bad, rotation
                    # would replace the good checkpoints with damaged ones. The next good step saves instead.
                    save_pending = self.guard.consecutive > 0
                    if save_pending:
                        self.log.line(f"step {self.step}: checkpoint postponed (the step was skipped)")
                    else:
                        self.save()
                if stop:
                    written = "not checkpointed: the step was skipped" if save_pending else "checkpoint written"
                    self.log.line(f"stopping at step {self.step} on request ({written})")
                    break
            self.log.line(f"done: {self.step} steps in {time.perf_counter() - start:.1f}s")
            completed = True
        finally:
            getattr(batches, "close", lambda: None)()  # stop the DataLoader workers now (else the exit stalls)
            self.log.close(failed=not completed)  # flush tensorboard (W&B: mark a failed run), also when aborting
        return self.history

    def _latest_checkpoint(self) -> Optional[str]:
        pointer = Path(self.cfg.checkpoint.dir) / LATEST
        return str(pointer.parent / pointer.read_text().strip()) if pointer.is_file() else None

    def _log_step(self, loss: float) -> None:
        cfg = self.cfg.train
        lr = self.engine.get_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        # skipped bad samples and remote retries, summed over the data-parallel ranks (each reads its own share)
        data_counts = torch.tensor([float(self.loader.bad_samples), float(self.loader.retries)],
                                   device=self.device)
        dist.all_reduce(data_counts, group=parallel_state.get_data_parallel_group())
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                   "train/skipped_steps": float(self.guard.skipped), "train/loss_spikes": float(self.guard.spikes),
                   "data/bad_samples": data_counts[0].item(), "data/retries": data_counts[1].item()}
        extra = getattr(self, "step_metrics", {})
        scalars.update(extra)
        tps = None
        if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
            perf = self.throughput.report()
            tps = perf["perf/tokens_per_s"]
            scalars.update(perf)
            scalars.update(memory_stats())
            eta = (cfg.steps - self.step) * perf["perf/step_time_s"]
            self.log.line(f"step {self.step}/{cfg.steps} loss {loss:.4f} lr {lr:.3e} grad_norm {grad_norm:.3f} "
                          f"tokens/s {tps:,.0f} {cfg.precision} mfu {perf['perf/mfu']:.1%} eta {eta:.0f}s"
                          + "".join(f" {k.rsplit('/', 1)[-1]} {v:.4f}" for k, v in extra.items()))
        self.log.scalars(self.step, scalars)
        self.log.step(loss, tps)

    def _log_eval(self) -> None:
        metrics = self.evaluate()
        if metrics:
            self.log.scalars(self.step, metrics)
            ppl = f" ppl {metrics['valid/ppl']:.2f}" if "valid/ppl" in metrics else ""
            self.log.line(f"step {self.step} valid loss {metrics['valid/loss']:.4f}{ppl}"
                          + "".join(f" {k.rsplit('/', 1)[-1]} {v:.4f}" for k, v in metrics.items()
                                    if k not in ("valid/loss", "valid/ppl")))

    def close(self) -> None:
        groups.destroy()


def build_run_loader(cfg, dp_rank: int, dp_size: int, train: bool = True):
    """The run's train (infinite, shuffled, workers) or validation (one ordered pass) loader for this data-parallel
    rank. Also what checkpoint conversion uses, so a converted checkpoint's data position fits the trainer's."""
    d = cfg.data
    return build_loader(
        datasets=[(spec.path, spec.weight) for spec in (d.train if train else d.valid)],
        seq_length=cfg.model.seq_length, batch_size=cfg.train.micro_batch_size, rank=dp_rank, world_size=dp_size,
        num_workers=d.num_workers if train else 0, shuffle_buffer=d.shuffle_buffer if train else 0, seed=d.seed,
        infinite=train, skip_bad_samples=d.skip_bad_samples, remote=remote_settings(d),
        **get_arch(cfg.model.arch).loader_kwargs(cfg),  # the sample kind (BERT: masked sentence pairs)
    )

"""Model + DeepSpeed engine construction, and the step functions that drive them.

The trainer (loop, logging, checkpoints) is the same for every model; what differs - which model is built, how a
micro-batch becomes a loss, how an optimizer step is driven - lives here:

* ``DenseStep``: a whole model per rank (data + tensor parallel, any ZeRO stage); DeepSpeed's engine runs
  forward/backward/step per micro-batch and steps the optimizer at the accumulation boundary.
"""

from __future__ import annotations

from typing import Iterator

import deepspeed
import torch
from megatron.core import parallel_state

from largelm.config import Config
from largelm.model.gpt import build_gpt_model, gpt_forward_loss
from largelm.parallel import groups
from largelm.parallel.deepspeed_config import deepspeed_config
from largelm.train.optim import param_groups
from largelm.train.schedule import build_scheduler


def model_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def initialize_engine(cfg: Config, model: torch.nn.Module, world_size: int, mpu=None):
    """Wrap ``model`` in a DeepSpeed engine configured from ``cfg`` (optimizer, ZeRO, bf16, LR schedule)."""
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optimizer.weight_decay),
        config=deepspeed_config(cfg, world_size),
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.optimizer, cfg.train.steps),
        mpu=mpu,
        dist_init_required=False,
    )
    return engine


class DenseStep:
    """GPT without pipeline parallelism: every rank holds all layers (its TP shard of them)."""

    def __init__(self, cfg: Config, world_size: int):
        self.cfg = cfg
        model = build_gpt_model(cfg.model, cfg.parallel, vocab_size=cfg.model.vocab_size, dtype=model_dtype(cfg))
        self.engine = initialize_engine(cfg, model, world_size, mpu=groups.DeepSpeedMPU())
        self.device = groups.device()

    def train_step(self, batches: Iterator[dict]) -> torch.Tensor:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns this rank's mean loss."""
        self.engine.train()
        losses = []
        for _ in range(self.cfg.train.grad_accum_steps):
            _, loss = gpt_forward_loss(self.engine, next(batches)["tokens"])
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        self.engine.eval()
        return gpt_forward_loss(self.engine, batch["tokens"])[1]


def build_step(cfg: Config, world_size: int):
    """The step driver for this config's model and layout."""
    return DenseStep(cfg, world_size)


def data_parallel_rank_and_size() -> tuple[int, int]:
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()

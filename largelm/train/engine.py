"""DeepSpeed engine construction: wrap a built model (dense module or pipeline stage) in a DeepSpeed engine
configured from the run's config, with largelm's DeepSpeed adaptations installed (largelm.parallel.deepspeed_compat).
The step drivers that use it are in largelm/train/step.py."""

from __future__ import annotations

import contextlib

import deepspeed
import torch

from largelm.config import Config
from largelm.parallel.deepspeed_compat import install_deepspeed_compat
from largelm.parallel.deepspeed_compat.moe import (
    expert_optimizer_groups,
    expert_param_groups,
    has_expert_params,
    register_expert_groups,
)
from largelm.parallel.deepspeed_config import deepspeed_config
from largelm.train.optim import param_groups
from largelm.train.schedule import build_scheduler


def initialize_engine(cfg: Config, model: torch.nn.Module, world_size: int, mpu=None):
    """Wrap ``model`` in a DeepSpeed engine configured from ``cfg`` (optimizer, ZeRO, bf16, LR schedule), with
    largelm's DeepSpeed patches for this run installed (``largelm.parallel.deepspeed_compat``). A model with
    expert-parallel MoE experts gets DeepSpeed's expert parameter groups, reduced over megatron's expert-data-parallel
    group (``largelm.parallel.deepspeed_compat.moe``)."""
    groups = param_groups(model, cfg.optimizer.weight_decay)
    experts = has_expert_params(model)
    if experts:
        register_expert_groups(cfg.parallel.expert_parallel)
        groups = expert_param_groups(groups)
    with expert_optimizer_groups() if experts else contextlib.nullcontext():
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            config=deepspeed_config(cfg, world_size),
            lr_scheduler=lambda opt: build_scheduler(opt, cfg.optimizer, cfg.train.steps),
            mpu=mpu,
            dist_init_required=False,
        )
    install_deepspeed_compat(engine, cfg, world_size)
    return engine

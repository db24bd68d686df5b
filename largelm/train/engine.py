"""DeepSpeed engine construction: wrap a built model (dense module or pipeline stage) in a DeepSpeed engine
configured from the run's config, with largelm's DeepSpeed adaptations installed (largelm.parallel.deepspeed_compat).
The step drivers that use it are in largelm/train/step.py."""

from __future__ import annotations

import deepspeed
import torch

from largelm.config import Config
from largelm.parallel.deepspeed_compat import install_deepspeed_compat
from largelm.parallel.deepspeed_config import deepspeed_config
from largelm.train.optim import param_groups
from largelm.train.schedule import build_scheduler


def initialize_engine(cfg: Config, model: torch.nn.Module, world_size: int, mpu=None):
    """Wrap ``model`` in a DeepSpeed engine configured from ``cfg`` (optimizer, ZeRO, bf16, LR schedule), with
    largelm's DeepSpeed patches for this run installed (``largelm.parallel.deepspeed_compat``)."""
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optimizer.weight_decay),
        config=deepspeed_config(cfg, world_size),
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.optimizer, cfg.train.steps),
        mpu=mpu,
        dist_init_required=False,
    )
    install_deepspeed_compat(engine, cfg, world_size)
    return engine

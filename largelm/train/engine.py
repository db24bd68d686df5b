"""DeepSpeed engine construction: wrap a built model (dense module or pipeline stage) in a DeepSpeed engine
configured from the run's config. The step drivers that use it are in largelm/train/step.py."""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist

from largelm.config import Config
from largelm.hardware import is_bf16
from largelm.parallel.deepspeed_config import deepspeed_config, engine_zero_stage, skips_data_parallel_reduction
from largelm.train.optim import (
    accumulate_bf16_gradients_in_place,
    clip_inside_fused_adamw,
    param_groups,
    use_fused_adamw,
)
from largelm.train.schedule import build_scheduler


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
    use_fused_adamw(engine.optimizer)  # one-pass in-place AdamW on ZeRO's flat partitions (largelm/train/optim.py)
    accumulate_bf16_gradients_in_place(engine.optimizer)  # BF16_Optimizer: one pass per gradient, no clears
    clip_inside_fused_adamw(engine.optimizer)  # BF16_Optimizer: clipping applied in the AdamW pass
    stage = engine_zero_stage(cfg, world_size)
    if stage != cfg.parallel.zero_stage and dist.get_rank() == 0:
        print(f"one data-parallel replica: DeepSpeed runs ZeRO-{stage} for parallel.zero_stage="
              f"{cfg.parallel.zero_stage} (same math, nothing to partition; parallel.single_replica_zero)", flush=True)
    if stage == 0 and not is_bf16(cfg):
        report_zero0_grad_norm(engine)
    if skips_data_parallel_reduction(cfg, world_size):
        # The all-reduce over a data-parallel group of one is an identity; DeepSpeed's dense and pipeline engines
        # each have a switch for it (the pipeline's tied-weight all-reduce is separate and still runs).
        engine.enable_backward_allreduce = False
        if hasattr(engine, "pipeline_enable_backward_allreduce"):
            engine.pipeline_enable_backward_allreduce = False
    return engine


def report_zero0_grad_norm(engine) -> None:
    """Make ``engine.get_global_grad_norm()`` work for DeepSpeed's fp32 ZeRO-0 engine, as it does for every other.

    That engine steps the torch optimizer directly and clips with ``deepspeed.runtime.utils.clip_grad_norm_``,
    discarding the norm it returns, so the trainer would log ``grad_norm nan`` and the non-finite-gradient guard
    would see nothing. The norm is kept from the clipping call, or (no clipping) computed by the same function with
    an infinite threshold in an optimizer pre-step hook - model-parallel aware through the engine's mpu either way.
    """
    from deepspeed.runtime.utils import clip_grad_norm_

    def norm(max_norm: float) -> None:
        engine._global_grad_norm = clip_grad_norm_(engine.module.parameters(), max_norm=max_norm, mpu=engine.mpu)

    if engine.gradient_clipping() > 0:
        engine.clip_fp32_gradients = lambda: norm(engine.gradient_clipping())
    else:
        engine.optimizer.register_step_pre_hook(lambda *_: norm(float("inf")))

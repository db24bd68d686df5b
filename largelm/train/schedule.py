"""Learning-rate schedule with Megatron semantics: linear warmup from 0 to ``lr``, then cosine/linear decay to
``min_lr`` at the last step (constant keeps ``lr``)."""

from __future__ import annotations

import math

import torch

from largelm.config import OptimizerConfig


def lr_at(step: int, opt: OptimizerConfig, total_steps: int) -> float:
    """Learning rate used by optimizer step ``step`` (0-based)."""
    if opt.warmup_steps and step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.decay_style == "constant":
        return opt.lr
    decay_steps = max(1, total_steps - opt.warmup_steps - 1)
    progress = min(1.0, (step - opt.warmup_steps) / decay_steps)
    if opt.decay_style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return opt.min_lr + (opt.lr - opt.min_lr) * factor


def build_scheduler(optimizer: torch.optim.Optimizer, opt: OptimizerConfig, total_steps: int):
    """A LambdaLR over every param group (they share ``opt.lr`` as base lr)."""
    for group in optimizer.param_groups:
        group["lr"] = opt.lr
        group["initial_lr"] = opt.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, opt, total_steps) / opt.lr)

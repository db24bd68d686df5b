"""DeepSpeed 0.19.8 engine-step patches: an overflow check for the optimizer that lacks one (fp32 ZeRO-0), the
gradient norm fp32 ZeRO-0 discards, and the data-parallel all-reduce over a group of one switched off (entries
``overflow_guard``, ``zero0_grad_norm``, ``skip_dp_allreduce`` of ``largelm.parallel.deepspeed_compat.PATCHES``;
installed by ``install_deepspeed_compat``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.runtime.utils import clip_grad_norm_


def install_overflow_guard(engine) -> bool:
    """Give ``engine.optimizer`` DeepSpeed's ``overflow`` semantics if it lacks them (ZeRO-0 fp32).

    Before the wrapped optimizer steps, a flag "some gradient is non-finite" is all-reduced (MAX) over all
    ranks; if set, gradients are dropped and the update is skipped, and ``optimizer.overflow`` tells DeepSpeed's
    engine not to step the LR scheduler and to count the step in ``engine.skipped_steps``. Returns True if the
    optimizer is guarded (installed now or by an earlier call: a second call changes nothing), False when the
    optimizer has DeepSpeed's own overflow check.
    """
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None:
        return False
    if getattr(optimizer.step, "largelm_overflow_guard", False):
        return True
    if hasattr(optimizer, "overflow"):
        return False
    original_step = optimizer.step

    def guarded_step(*args, **kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = params[0].grad.device if params else torch.device("cpu")
        bad = torch.zeros(1, device=device)
        for p in params:
            bad += (~torch.isfinite(p.grad)).any().float()
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        optimizer.overflow = bool(bad.item())
        if optimizer.overflow:
            for p in params:
                p.grad = None
            return None
        return original_step(*args, **kwargs)

    guarded_step.largelm_overflow_guard = True
    optimizer.step = guarded_step
    optimizer.overflow = False
    return True


def report_zero0_grad_norm(engine) -> None:
    """Make ``engine.get_global_grad_norm()`` work for DeepSpeed's fp32 ZeRO-0 engine, as it does for every other.

    That engine steps the torch optimizer directly and clips with ``deepspeed.runtime.utils.clip_grad_norm_``,
    discarding the norm it returns, so the trainer would log ``grad_norm nan`` and the non-finite-gradient guard
    would see nothing. The norm is kept from the clipping call, or (no clipping) computed by the same function with
    an infinite threshold in an optimizer pre-step hook - model-parallel aware through the engine's mpu either way.
    """

    def norm(max_norm: float) -> None:
        engine._global_grad_norm = clip_grad_norm_(engine.module.parameters(), max_norm=max_norm, mpu=engine.mpu)

    if engine.gradient_clipping() > 0:
        engine.clip_fp32_gradients = lambda: norm(engine.gradient_clipping())
    else:
        engine.optimizer.register_step_pre_hook(lambda *_: norm(float("inf")))


def skip_data_parallel_allreduce(engine) -> None:
    """Switch off the engine's data-parallel gradient all-reduce (``deepspeed_config.skips_data_parallel_reduction``
    says when it is an identity). DeepSpeed's dense and pipeline engines each have a switch for it (the pipeline's
    tied-weight all-reduce is separate and still runs)."""
    engine.enable_backward_allreduce = False
    if hasattr(engine, "pipeline_enable_backward_allreduce"):
        engine.pipeline_enable_backward_allreduce = False

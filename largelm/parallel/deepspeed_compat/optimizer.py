"""DeepSpeed 0.19.8 optimizer patches: torch's fused AdamW under DeepSpeed's wrappers, ``BF16_Optimizer``'s gradient
accumulation in place and its clipping inside the fused AdamW pass (entries ``fused_adamw``, ``bf16_grad_in_place``,
``fused_clip`` of ``largelm.parallel.deepspeed_compat.PATCHES``; installed by ``install_deepspeed_compat``)."""

from __future__ import annotations

import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer


def use_fused_adamw(optimizer) -> bool:
    """Switch the ``torch.optim.AdamW`` a DeepSpeed optimizer steps to torch's fused kernel; True if switched.

    DeepSpeed's ``torch_adam`` creates ``torch.optim.AdamW(foreach=...)`` and has no way to ask for ``fused``. ZeRO
    then steps it on large flat fp32 partitions, where the default implementation runs ~10 passes over the whole
    partition with full-size temporaries (on CPU, fresh pages every step); the fused kernel updates params and both
    moments in place in one pass: 11x faster on a 27M-element partition (1 CPU thread), the same AdamW math.
    ``fused`` is a per-param-group option that ``AdamW.step`` reads at every step, so setting it on the groups
    after construction is equivalent to constructing with ``fused=True``. Left alone (False) when the inner
    optimizer is not AdamW/Adam or a tensor is on a device or of a dtype the fused kernel does not support.
    """
    inner = optimizer
    for _ in range(4):  # DeepSpeed wrappers (ZeRO, BF16_Optimizer, FP16_*Optimizer) keep the torch one in .optimizer
        if isinstance(inner, (torch.optim.AdamW, torch.optim.Adam)):
            break
        inner = getattr(inner, "optimizer", None)
    if not isinstance(inner, (torch.optim.AdamW, torch.optim.Adam)):
        return False
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        devices = {"cpu", "cuda"}
    params = [p for g in inner.param_groups for p in g["params"]]
    if any(g.get("differentiable") or g.get("capturable") for g in inner.param_groups) or not all(
        p.device.type in devices and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params
    ):
        return False
    inner.defaults.update(fused=True, foreach=False)
    for group in inner.param_groups:
        group.update(fused=True, foreach=False)
    return True


def accumulate_bf16_gradients_in_place(optimizer) -> bool:
    """Make DeepSpeed's ``BF16_Optimizer`` write its fp32 gradient buffers in one pass per gradient. True if installed.

    Stock, every step costs three full passes over the model's fp32 gradients besides the one that matters: the
    buffers are zeroed twice (at the end of ``step()``, then by the engine's ``zero_grad()``), and each bf16
    gradient is first cast into a temporary fp32 tensor (``lp.grad.to(float32)``) which is then added into the
    zeroed buffer (~12 ms of a ~280 ms gpt-25m bf16 step on CPU). Here the *first* gradient a parameter receives
    after a clear is cast straight into its buffer slice (``copy_``: the value of adding it to zero) and later ones
    are added without a temporary (``add_`` promotes bf16 to fp32 inside the kernel): the same fp32 numbers. A clear
    only resets the optimizer's per-parameter "has a gradient" flags (``fp32_groups_has_gradients``, which DeepSpeed
    already keeps and which its norm already honours); slices of parameters that received no gradient are zeroed
    right before anything reads the whole buffer - the data-parallel reduction (``get_grads_for_reduction``) and
    ``step()``. Not installed for expert-parallel (MoE) or AutoEP-folded optimizers, whose gradient paths differ.
    """
    if (not isinstance(optimizer, BF16_Optimizer) or optimizer.has_moe_layers
            or getattr(optimizer, "autoep_folding_tp_group", None) is not None):
        return False
    written = optimizer.fp32_groups_has_gradients  # [group][param]; DeepSpeed replaces the inner lists on clear

    @torch.no_grad()
    def update_hp_grad(lp, group_idx: int, param_idx: int, clear_lp_grads: bool) -> None:
        if lp.grad is None:
            return
        hp_grad = optimizer.fp32_groups_gradients[group_idx][param_idx]
        if written[group_idx][param_idx]:
            hp_grad.add_(lp.grad.view(hp_grad.shape))
        else:
            hp_grad.copy_(lp.grad.view(hp_grad.shape))
        lp._hp_grad = hp_grad
        written[group_idx][param_idx] = True
        if clear_lp_grads:
            lp.grad.zero_()

    def clear_hp_grads() -> None:
        for i, group in enumerate(optimizer.fp32_groups_gradients):
            written[i] = [False] * len(group)

    @torch.no_grad()
    def zero_unwritten() -> None:
        for i, group in enumerate(optimizer.fp32_groups_gradients):
            for j, hp_grad in enumerate(group):
                if not written[i][j]:
                    hp_grad.zero_()

    def before(method):
        def wrapped(*args, **kwargs):
            zero_unwritten()
            return method(*args, **kwargs)
        return wrapped

    optimizer._update_hp_grad = update_hp_grad
    optimizer.clear_hp_grads = clear_hp_grads
    optimizer.get_grads_for_reduction = before(optimizer.get_grads_for_reduction)
    optimizer.step = before(optimizer.step)
    return True


def clip_inside_fused_adamw(optimizer) -> bool:
    """Let torch's fused AdamW apply ``BF16_Optimizer``'s gradient clipping instead of a separate pass. True if done.

    DeepSpeed clips by multiplying every fp32 gradient by ``max_norm / (norm + 1e-6)`` in place, one more pass over
    the model's gradients (~3.6 ms of a ~270 ms gpt-25m bf16 step on CPU), just before the AdamW pass reads them
    again. torch's fused AdamW takes a ``grad_scale`` that it divides every gradient by inside its one pass (the
    hook ``GradScaler`` uses). So during ``step()`` DeepSpeed's clip is switched off (``clip_grad`` is 0 only
    while it runs; checkpoints keep the configured value) and a step pre-hook on the torch optimizer sets
    ``grad_scale = (norm + 1e-6) / max_norm`` from the norm DeepSpeed has just computed whenever that is above 1 -
    the same clipping, up to the rounding of one division. Only for a ``BF16_Optimizer`` with clipping whose torch
    optimizer runs fused (``use_fused_adamw``): the other implementations refuse ``grad_scale``.
    """
    inner = getattr(optimizer, "optimizer", None)
    if (not isinstance(optimizer, BF16_Optimizer) or not optimizer.clip_grad > 0
            or not isinstance(inner, (torch.optim.AdamW, torch.optim.Adam))
            or not all(group.get("fused") for group in inner.param_groups)):
        return False
    pending = {}  # max_norm while a BF16_Optimizer.step() runs

    def set_grad_scale(*_) -> None:  # grad_scale is None outside step_with_fused_clip
        if "max_norm" in pending:
            scale = (torch.as_tensor(optimizer._global_grad_norm, dtype=torch.float32) + 1e-6) / pending["max_norm"]
            if scale > 1:  # DeepSpeed clips only when max_norm / (norm + eps) < 1
                inner.grad_scale = scale.to(optimizer.fp32_groups_flat_partition[0].device)

    step = optimizer.step

    def step_with_fused_clip(*args, **kwargs):
        pending["max_norm"], optimizer.clip_grad = optimizer.clip_grad, 0.0
        try:
            return step(*args, **kwargs)
        finally:
            optimizer.clip_grad = pending.pop("max_norm")
            inner.grad_scale = None

    inner.register_step_pre_hook(set_grad_scale)
    optimizer.step = step_with_fused_clip
    return True

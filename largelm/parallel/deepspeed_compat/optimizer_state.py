"""Per-parameter fp32 master weights and Adam state of a DeepSpeed 0.19.8 engine, read and written whole
(full, unpartitioned tensors of this rank's model-parallel shard) whatever optimizer DeepSpeed built.

DeepSpeed's ``safe_{get,set}_full_fp32_param`` / ``safe_{get,set}_full_optimizer_state`` do this for ZeRO-1/2,
BF16_Optimizer (``param._hp_mapping``) and ZeRO-3 (``param.ds_id``), collectively over the data-parallel group
for the getters. They do nothing for an engine without ZeRO (``engine_zero_stage`` 0: largelm's single-replica
fp32 runs), where DeepSpeed steps the torch AdamW on the module's own parameters: there the parameter is the
master and the torch optimizer's ``state[param]`` holds the moments (created at its first step, so a resume
before any step creates them here). Adam's step count is the torch optimizer's per-tensor ``state["step"]``,
which none of DeepSpeed's helpers touch: ``set_adam_step`` writes it on every tensor the torch optimizer steps.
ZeRO-1/2 and BF16_Optimizer create the Adam state only at their first step: ``create_adam_state`` does it first.
"""

from __future__ import annotations

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed steps (under ZeRO / BF16_Optimizer wrappers, kept in ``.optimizer``)."""
    inner = engine.optimizer
    for _ in range(4):
        if isinstance(inner, torch.optim.Optimizer) and not hasattr(inner, "optimizer"):
            return inner
        inner = getattr(inner, "optimizer", None)
    raise RuntimeError(f"no torch optimizer found under {type(engine.optimizer).__name__}")


def _partitioned(param) -> bool:
    """Held by a ZeRO / BF16_Optimizer partition (``_hp_mapping`` is None on the ranks whose partition does not
    hold the parameter: DeepSpeed's helpers then do nothing there, as they should)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def get_full_state(engine, param) -> dict[str, torch.Tensor]:
    """``{"fp32", "exp_avg", "exp_avg_sq"}`` of ``param``, full and fp32 on the CPU (collective under ZeRO: every
    data-parallel rank calls it for the same parameters in the same order)."""
    if _partitioned(param):
        out = {"fp32": safe_get_full_fp32_param(param)}
        out.update({key: safe_get_full_optimizer_state(param, key) for key in ADAM_KEYS})
    else:
        state = torch_optimizer(engine).state.get(param, {})
        out = {"fp32": param.detach()}
        out.update({key: state.get(key, torch.zeros_like(param, dtype=torch.float32)) for key in ADAM_KEYS})
    return {k: v.detach().float().cpu().clone() for k, v in out.items()}


def create_adam_state(engine) -> None:
    """Create the torch optimizer's Adam state (zero moments) before its first step and link DeepSpeed's
    per-parameter views of it. ZeRO-1/2 and BF16_Optimizer create both lazily at the first ``step()``
    (``_lazy_init_hp_params_optimizer_state``): until then ``safe_set_full_optimizer_state`` has nothing to write
    into. torch's Adam initialises only an empty ``state[p]``, so the tensors created here are the ones it steps."""
    optimizer = torch_optimizer(engine)
    for p in _stepped_tensors(engine):
        state = optimizer.state[p]
        for key in ADAM_KEYS:
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def set_full_state(engine, param, fp32: torch.Tensor, moments: dict[str, torch.Tensor]) -> None:
    """Give ``param`` the master value ``fp32`` and the Adam moments (full tensors of this rank's shard; after
    ``create_adam_state``)."""
    if _partitioned(param):
        safe_set_full_fp32_param(param, fp32)
        for key in ADAM_KEYS:
            safe_set_full_optimizer_state(param, moments[key], key)
        return
    with torch.no_grad():
        param.copy_(fp32.to(param.dtype))
    state = torch_optimizer(engine).state[param]
    for key in ADAM_KEYS:
        state[key] = moments[key].to(device=param.device, dtype=param.dtype).clone().reshape(param.shape)


def set_adam_step(engine, step: float) -> None:
    """Adam's step count on every tensor the torch optimizer steps (its bias correction reads it)."""
    optimizer = torch_optimizer(engine)
    group = optimizer.param_groups[0]
    on_device = group.get("fused") or group.get("capturable")  # where torch's Adam keeps the count
    for p in _stepped_tensors(engine):
        device = p.device if on_device else torch.device("cpu")
        optimizer.state[p]["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)


def get_adam_steps(engine) -> set[float]:
    """The distinct Adam step counts of the torch optimizer's tensors (one value in a consistent optimizer)."""
    optimizer = torch_optimizer(engine)
    return {float(optimizer.state[p]["step"]) for p in _stepped_tensors(engine) if "step" in optimizer.state.get(p, {})}


def _stepped_tensors(engine) -> list[torch.Tensor]:
    """The tensors the torch optimizer steps (and keys its state by). ZeRO-3 puts its fp32 partitions into the
    torch optimizer's param groups only around ``step()``/``state_dict()``: they are in
    ``fp32_partitioned_groups_flat``."""
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flats is not None:
        return list(flats)
    return [p for group in torch_optimizer(engine).param_groups for p in group["params"]]

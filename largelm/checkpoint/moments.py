"""Adam's moments and step count in DeepSpeed 0.19.8 checkpoint files, for the reader (reader.py), which merges
them with the same zero_to_fp32 functions as the fp32 master weights: ZeRO-1/2, BF16_Optimizer and ZeRO-3 keep
``exp_avg``/``exp_avg_sq`` in flat partitions of exactly the master weights' layout; an engine without ZeRO keeps
the torch optimizer's per-parameter state."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from largelm.errors import ConversionError

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def flat_moments(path: Path, fp32_flat: list, base) -> tuple[dict[str, list], float]:
    """One ZeRO partition's Adam moments as flat groups shaped like its fp32 master groups ``fp32_flat``, and its
    Adam step. The torch optimizer under ZeRO / BF16_Optimizer steps one flat tensor per (sub-)group, in group
    order: its state entry ``i`` belongs to ``fp32_flat[i]``. ZeRO-1/2 store the fp32 groups without their
    alignment padding but the moments with it, at the end: cut to the fp32 group's length."""
    if not isinstance(base, dict) or not isinstance(base.get("state"), dict):
        raise ConversionError(f"{path} holds no Adam state (base_optimizer_state): the optimizer cannot be carried")
    entries = [base["state"][k] for k in sorted(base["state"])]
    if len(entries) != len(fp32_flat):
        raise ConversionError(f"{path}: {len(entries)} optimizer state entries for {len(fp32_flat)} flat groups")
    out = {name: [] for name in ADAM_MOMENTS}
    steps = set()
    for i, (entry, master) in enumerate(zip(entries, fp32_flat)):
        for name in ADAM_MOMENTS:
            if name not in entry or entry[name].numel() < master.numel():
                raise ConversionError(f"{path}: group {i} lacks a full {name} ({master.numel()} elements)")
            out[name].append(entry[name].flatten()[: master.numel()].float())
        steps.add(float(entry["step"]))
    return out, one_step(steps, str(path))


def one_step(steps: set, where: str) -> torch.Tensor:
    if len(steps) != 1:
        raise ConversionError(f"{where}: the optimizer's parameter groups are at different Adam steps {sorted(steps)}")
    return torch.tensor(steps.pop(), dtype=torch.float32)


def zero0_moments(info, model_state: dict, dense_param_groups: Callable) -> dict:
    """Adam's moments of an engine without ZeRO: DeepSpeed stores the torch optimizer's state dict (under
    ``optimizer_state_dict`` for FP16_Optimizer), one entry per parameter in parameter-group order, which
    ``reader._dense_param_groups`` rebuilds from largelm's grouping rule (and checks against the tensors)."""
    shapes = dense_param_groups(model_state, info.config.model, info.config.bert)
    if shapes is None:
        raise ConversionError(f"{info.path}: the optimizer's parameter order cannot be rebuilt (ZeRO-0, not a dense "
                              "model): the optimizer cannot be carried")
    names = [name for group in shapes for name in group]
    optimizer = model_state.get("optimizer")
    inner = optimizer.get("optimizer_state_dict", optimizer) if isinstance(optimizer, dict) else None
    if not isinstance(inner, dict) or not isinstance(inner.get("state"), dict):
        raise ConversionError(f"{info.path}: no optimizer state in the model-states file (ZeRO-0): the optimizer "
                              "cannot be carried")
    count = sum(len(g["params"]) for g in inner.get("param_groups", []))
    if count != len(names):
        raise ConversionError(f"{info.path}: the optimizer has {count} parameters, the model {len(names)}")
    out: dict = {name: {} for name in ADAM_MOMENTS}
    steps = set()
    index = [p for g in inner["param_groups"] for p in g["params"]]
    for name, key in zip(names, index):
        entry = inner["state"].get(key)
        if entry is None:
            raise ConversionError(f"{info.path}: no optimizer state for {name} (saved before the first step?)")
        for moment in ADAM_MOMENTS:
            out[moment][name] = entry[moment].float().clone()
        steps.add(float(entry["step"]))
    out["step"] = {"step": one_step(steps, str(info.path))}
    return out

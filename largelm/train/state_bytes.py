"""Per-rank bytes of training state (parameters, gradients, optimizer state) read from a DeepSpeed engine's tensors.

``training_state_bytes(engine)`` walks what the engine actually holds on this rank - the model's parameters
(under ZeRO-3 their ``ds_tensor`` partitions), their ``.grad``, and every tensor reachable from the (ZeRO/bf16)
optimizer object and its torch optimizer's ``state`` - and counts each underlying storage once (flat buffers and
the views into them are one allocation). Nothing is computed from the model shape. The result is what
``bench/p5_memory.py`` compares with ideal 1/DP partitioning; it is cheap enough to log.

Categories (by where a storage is first found, in this order):

* ``params``: storages behind the module's parameters (bf16/fp32 model weights; ZeRO-3: the partitions).
* ``grads``: ``.grad`` of any tensor found, and optimizer attributes named ``*grad*`` or ``*bucket*`` (gradient
  partitions, fp32 accumulation buffers, reduction buckets).
* ``optimizer``: the torch optimizer's state (``exp_avg``, ``exp_avg_sq``, ``step``) and the tensors it steps
  (the fp32 master weights or their partitions; in fp32 without ZeRO these are the parameters themselves and
  count as ``params``), plus attributes named ``*fp32*``/``*master*``.
* ``other``: every other tensor reachable from the optimizer (e.g. communication staging buffers).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterator

import torch

CATEGORIES = ("params", "grads", "optimizer", "other")


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _walk(obj: Any, path: str, seen: set, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(attribute path, tensor) for every tensor reachable from ``obj`` through containers and DeepSpeed/torch
    optimizer objects (not through modules, process groups or other libraries' objects)."""
    if depth > 8 or id(obj) in seen:
        return
    if isinstance(obj, torch.Tensor):
        seen.add(id(obj))
        yield path, obj
        if obj.grad is not None:
            yield path + ".grad", obj.grad
        return
    if isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, torch.Tensor):  # torch optimizer state: {param: {...}}
                yield from _walk(key, f"{path}{{key}}", seen, depth + 1)
                name = "state"
            else:
                name = str(key)
            yield from _walk(value, f"{path}[{name}]", seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{path}[{i}]", seen, depth + 1)
    elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
        for name, value in vars(obj).items():
            yield from _walk(value, f"{path}.{name}" if path else name, seen, depth + 1)


def _category(path: str) -> str:
    p = path.lower()
    if "grad" in p or "bucket" in p:  # gradients, their partitions and reduction buckets
        return "grads"
    if "[state]" in p or "{key}" in p or "param_groups" in p or "fp32" in p or "master" in p:
        return "optimizer"  # Adam moments, and the (fp32 master) tensors the torch optimizer steps
    return "other"


def training_state_bytes(engine, detail: bool = False) -> dict:
    """``{"params": B, "grads": B, "optimizer": B, "other": B, "total": B}`` for this rank (bytes), each storage
    counted once. ``detail=True`` adds ``"detail": {category: {attribute path: bytes}}``."""
    counted: dict[tuple[int, int], str] = {}
    sizes: dict[str, int] = defaultdict(int)
    where: dict[str, dict[str, int]] = defaultdict(dict)

    def add(category: str, path: str, t: torch.Tensor) -> None:
        if t.is_meta:  # shape-only placeholders hold no memory
            return
        key = _storage_key(t)
        if key[1] == 0 or key in counted:
            return
        counted[key] = category
        sizes[category] += key[1]
        where[category][path] = where[category].get(path, 0) + key[1]

    params = list(engine.module.named_parameters())
    for name, p in params:
        add("params", name, p.data)
        ds_tensor = getattr(p, "ds_tensor", None)  # ZeRO-3 partition of this parameter
        if ds_tensor is not None:
            add("params", name + ".ds_tensor", ds_tensor)
    for name, p in params:
        if p.grad is not None:
            add("grads", name + ".grad", p.grad)
        ds_tensor = getattr(p, "ds_tensor", None)
        if ds_tensor is not None and ds_tensor.grad is not None:
            add("grads", name + ".ds_tensor.grad", ds_tensor.grad)
    optimizer = engine.optimizer
    found = list(_walk(optimizer, "", set()))
    inner = getattr(optimizer, "optimizer", None)  # the torch optimizer a ZeRO/bf16 wrapper steps
    if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
        found += list(_walk(inner, "optimizer", set()))
    # gradients first (a master tensor's .grad is a gradient), then optimizer state, then the rest
    order = {"grads": 0, "optimizer": 1, "other": 2}
    for path, t in sorted(found, key=lambda item: order[_category(item[0])]):
        add(_category(path), path, t)
    out = {c: sizes.get(c, 0) for c in CATEGORIES}
    out["total"] = sum(out.values())
    if detail:
        out["detail"] = {c: dict(sorted(where[c].items(), key=lambda kv: -kv[1])) for c in CATEGORIES if where[c]}
    return out

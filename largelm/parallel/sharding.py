"""Tensor-parallel sharding of full (TP=1) weights, driven by megatron-core's own parameter attributes.

megatron-core marks every tensor-parallel parameter with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``; its CPU initialisation splits a full master weight into ``tp * stride`` chunks along
``partition_dim`` and gives rank ``r`` chunks ``r, r + tp, ...``. Stride 2 is the fused SwiGLU ``linear_fc1``
([gate; up]): each rank holds [gate_r; up_r]. We apply the same rule, so sharding a TP=1 state dict reproduces
exactly what a TP=N run initialised from the same full weights holds, and unsharding inverts it.
"""

from __future__ import annotations

import torch


def shard_tensor(full: torch.Tensor, rank: int, size: int, dim: int, stride: int = 1) -> torch.Tensor:
    if full.shape[dim] % (size * stride):
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} does not divide into {size} x {stride} shards")
    chunks = torch.chunk(full, size * stride, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim).clone()


def unshard_tensors(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    size = len(shards)
    pieces = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][k] for k in range(stride) for r in range(size)], dim=dim)


def tp_layout(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """name -> (partition_dim, stride) for every tensor-parallel parameter of a built megatron module."""
    return {
        name: (param.partition_dim, getattr(param, "partition_stride", 1))
        for name, param in module.named_parameters()
        if getattr(param, "tensor_model_parallel", False)
    }


def shard_state_dict(full: dict[str, torch.Tensor], module: torch.nn.Module, rank: int, size: int) -> dict:
    """The state dict ``module`` (built for TP rank ``rank`` of ``size``) should load, from full weights."""
    layout = tp_layout(module)
    out = {}
    for name, tensor in full.items():
        if name in layout and size > 1:
            dim, stride = layout[name]
            out[name] = shard_tensor(tensor, rank, size, dim, stride)
        else:
            out[name] = tensor
    return out

"""Tensor-parallel sharding of full (TP=1) weights, driven by megatron-core's own parameter attributes.

megatron-core marks every tensor-parallel parameter with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``; its CPU initialisation splits a full master weight into ``tp * stride`` chunks along
``partition_dim`` and gives rank ``r`` chunks ``r, r + tp, ...``. Stride 2 is the fused SwiGLU ``linear_fc1``
([gate; up]): each rank holds [gate_r; up_r]. We apply the same rule, so sharding a TP=1 state dict reproduces
exactly what a TP=N run initialised from the same full weights holds, and unsharding inverts it.
"""

from __future__ import annotations

import re

import torch

# an MoE expert parameter (megatron's SequentialMLP): ``<layer>.mlp.experts.local_experts.<index>.<rest>``
EXPERT_NAME = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


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


def expert_count(names) -> int:
    """Experts per MoE layer in a state dict's names (1 + the largest expert index; 0 without experts)."""
    indexes = [int(m.group(2)) for m in map(EXPERT_NAME.match, names) if m]
    return max(indexes) + 1 if indexes else 0


def local_expert_state_dict(full: dict[str, torch.Tensor], ep_rank: int, ep_size: int) -> dict:
    """Full (EP=1) weights as expert-parallel rank ``ep_rank`` of ``ep_size`` holds them: global expert
    ``ep_rank * E / ep_size + e`` becomes ``local_experts.e``; other ranks' experts are left out (megatron's
    contiguous expert assignment). Everything else is kept; a state dict without experts comes back unchanged."""
    experts = expert_count(full)
    if ep_size == 1 or experts == 0:
        return full
    if experts % ep_size:
        raise ValueError(f"{experts} experts do not divide over {ep_size} expert-parallel ranks")
    per_rank = experts // ep_size
    out = {}
    for name, tensor in full.items():
        match = EXPERT_NAME.match(name)
        if match is None:
            out[name] = tensor
            continue
        local = int(match.group(2)) - ep_rank * per_rank
        if 0 <= local < per_rank:
            out[f"{match.group(1)}{local}{match.group(3)}"] = tensor
    return out


def global_expert_name(name: str, ep_rank: int, local_experts: int) -> str:
    """A rank-local expert parameter name with the global expert index (``local_expert_state_dict`` inverted)."""
    match = EXPERT_NAME.match(name)
    if match is None:
        return name
    return f"{match.group(1)}{ep_rank * local_experts + int(match.group(2))}{match.group(3)}"

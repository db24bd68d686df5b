"""megatron-core's fused QKV layout <-> separate Q, K, V projections.

megatron's ``linear_qkv`` weight is ``[(nq + 2 ng) d, h]`` (bias ``[(nq + 2 ng) d]``) with rows grouped per
query group g = 0..ng-1: ``[q heads of group g (r = nq/ng heads) | k_g | v_g]``, each head ``d`` rows.
Separate projections (Hugging Face) are ``q [nq d, h]`` (heads in order, head j in group j // r), ``k, v [ng d, h]``.
"""

from __future__ import annotations

import torch


def split_qkv(fused: torch.Tensor, nq: int, ng: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r = nq // ng
    rest = tuple(fused.shape[1:])
    if fused.shape[0] != (nq + 2 * ng) * d:
        raise ValueError(f"fused QKV has {fused.shape[0]} rows, expected ({nq} + 2 x {ng}) x {d}")
    grouped = fused.reshape(ng, (r + 2) * d, *rest)
    q, k, v = grouped.split([r * d, d, d], dim=1)
    return q.reshape(nq * d, *rest), k.reshape(ng * d, *rest), v.reshape(ng * d, *rest)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nq: int, ng: int, d: int) -> torch.Tensor:
    r = nq // ng
    rest = tuple(q.shape[1:])
    for name, t, rows in (("q", q, nq * d), ("k", k, ng * d), ("v", v, ng * d)):
        if t.shape[0] != rows:
            raise ValueError(f"{name} projection has {t.shape[0]} rows, expected {rows}")
    grouped = torch.cat([q.reshape(ng, r * d, *rest), k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)], dim=1)
    return grouped.reshape((nq + 2 * ng) * d, *rest)

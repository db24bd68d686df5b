"""The two pieces megatron-core's *local* spec lacks for sequence parallelism (SP) under DeepSpeed.

With SP each tensor-parallel (TP) rank holds a slice of the sequence between the attention/MLP
blocks, so parameters applied there (the norms, and the biases of row-parallel linears) see only
their rank's tokens: their gradients are partial sums that must be summed over the TP group.
megatron marks such parameters with ``param.sequence_parallel = True`` and sums them in
``finalize_model_grads``, which belongs to megatron's own DDP; we train with DeepSpeed, so:

* ``SequenceParallelNorm`` is megatron's torch LayerNorm/RMSNorm that, like megatron's (apex)
  ``FusedLayerNorm``, marks its weights ``sequence_parallel``. (megatron's ``WrappedTorchNorm``
  asserts SP is off for exactly this reason.)
* ``reduce_sequence_parallel_grads_in_backward(model)`` hooks every marked parameter so its gradient
  is all-reduced over the TP group *inside* backward, before DeepSpeed sees it. Every TP rank then
  holds the full gradient, as without SP.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelNorm:
    """Builds ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` (per ``config.normalization``) and marks
    its parameters ``sequence_parallel``. Same constructor signature megatron's layer specs use."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization {config.normalization!r} is not LayerNorm or RMSNorm")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def reduce_sequence_parallel_grads_in_backward(model: torch.nn.Module) -> int:
    """Register TP all-reduce gradient hooks on parameters marked ``sequence_parallel``.

    Returns how many parameters were hooked (0 when TP is 1 or nothing is marked). Call once per
    model, after building it and before wrapping it in DeepSpeed.
    """
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return 0
    group = parallel_state.get_tensor_model_parallel_group()

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=group)
        return grad

    hooked = 0
    for param in model.parameters():
        if param.requires_grad and getattr(param, "sequence_parallel", False):
            param.register_hook(all_reduce)
            hooked += 1
    return hooked

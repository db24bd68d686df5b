"""Core attention for the layer spec: megatron's ``DotProductAttention`` with a faster causal path.

megatron-core's local spec computes attention unfused: it reshapes q/k/v from ``[s, b, heads, d]`` into
*strided* ``[b*heads, s, d]`` views, ``baddbmm`` into a score buffer, casts to fp32 for a masked softmax, casts
back, ``bmm``. On CPU the strided views are the cost: oneDNN's batched matmul accepts contiguous or transposed
operands only, so every product with a strided operand first makes a transposing copy, and autograd's backward
makes more (gpt-25m shape, fwd+bwd per layer: ~5.5 ms, of which ~1 ms is matmul).

Two subclasses keep megatron's module (its constructor: heads per TP partition, query groups, softmax scale,
dropout probability) and replace the computation of the causal, unmasked case:

* ``SDPAttention``: torch's fused ``F.scaled_dot_product_attention`` (flash/memory-efficient kernels on GPU).
* ``BmmAttention``: ``CausalBmmAttention``, the same math as megatron's unfused path written for the CPU: q/k/v
  copied once into contiguous per-head ``[b*heads, s, d]`` (cheap, the inner ``d`` stays contiguous), scale and
  causal mask folded into the score ``baddbmm``, softmax computed in fp32 and stored in the input dtype (as
  megatron's ``attention_softmax_in_fp32``), and a hand-written backward whose products all take contiguous or
  transposed operands (2.2 vs 5.3 ms at gpt-25m bf16, 6.2 vs 7.7 ms fp32, where torch's CPU SDPA takes 10.3 and
  8.5 ms).

Both compute megatron's function: causal attention, scale ``softmax_scale``, grouped-query attention, attention
dropout under megatron's tensor-parallel RNG fork exactly as ``DotProductAttention`` applies it. Anything else
(padding masks, as BERT's, whose fully masked query rows megatron fills with a uniform softmax; attention bias,
packed sequences, sliding windows, softmax offsets, query-key layer scaling, a query length other than the key
length) goes to megatron's own forward, so the subclasses are never wrong, only sometimes not faster.

``model.attention`` chooses (``core_attention_kind``): ``auto`` = SDPA on GPU, ``bmm`` on CPU; ``sdpa``, ``bmm``
and ``local`` (megatron's) force one.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from largelm.config import ModelConfig


@functools.lru_cache(maxsize=8)
def _causal_bias(s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[s, s] additive mask: -inf above the diagonal (a key after the query), 0 elsewhere."""
    return torch.full((s, s), float("-inf"), dtype=dtype, device=device).triu_(1)


class CausalBmmAttention(torch.autograd.Function):
    """softmax(scale * q k^T + causal) [dropout] v for contiguous q, k, v ``[batch*heads, s, d]``.

    Backward (P = softmax, D = dropout keep-mask / (1 - p)): dV = (P*D)^T dO; dP = (dO V^T) * D;
    dS = P * (dP - rowsum(dP * P)) (torch's softmax backward); dQ = scale * dS K; dK = scale * dS^T Q.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, dropout: float):
        scores = torch.baddbmm(_causal_bias(q.shape[1], q.dtype, q.device), q, k.transpose(1, 2), alpha=scale)
        # torch's softmax computes in fp32 for bf16/fp16 inputs: megatron's fp32 softmax, rounded once
        probs = torch.softmax(scores, dim=-1)
        keep = None
        if dropout:
            keep = torch.empty_like(probs).bernoulli_(1.0 - dropout).div_(1.0 - dropout)
        out = torch.bmm(probs * keep if keep is not None else probs, v)
        ctx.save_for_backward(q, k, v, probs, keep)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs, keep = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        # the dropped-out probabilities are recomputed rather than saved: one [b*heads, s, s] tensor less per layer
        dropped = probs * keep if keep is not None else probs
        grad_v = torch.bmm(dropped.transpose(1, 2), grad_out)
        grad_probs = torch.bmm(grad_out, v.transpose(1, 2))
        if keep is not None:
            grad_probs.mul_(keep)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        grad_q = torch.bmm(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None, None


class _CausalFastPath(DotProductAttention):
    """``DotProductAttention`` whose causal, unmasked case runs ``self._causal`` (the subclasses')."""

    def _fast_path_applies(self, query, key, attention_mask, attn_mask_type, attention_bias,
                           packed_seq_params) -> bool:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return (mask_type == AttnMaskType.causal and attention_mask is None and attention_bias is None
                and packed_seq_params is None and self.softmax_offset is None
                and not self.config.apply_query_key_layer_scaling
                and self.scale_mask_softmax.window_size is None and query.shape[0] == key.shape[0])

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not self._fast_path_applies(query, key, attention_mask, attn_mask_type, attention_bias,
                                       packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        dropout = self.attention_dropout.p if self.training else 0.0
        # as DotProductAttention: dropout draws from the tensor-parallel RNG stream unless sequence parallel
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel
               else contextlib.nullcontext())
        with rng:
            context = self._causal(query, key, value, dropout)  # [s, b, heads, d]
        return context.reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)

    def _causal(self, query, key, value, dropout: float):
        raise NotImplementedError


class SDPAttention(_CausalFastPath):
    """Causal attention by ``F.scaled_dot_product_attention`` (the choice on GPU)."""

    def _causal(self, query, key, value, dropout: float):
        # [s, b, heads, d] -> [b, heads, s, d] (views; the kernel takes strided inputs)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale,
            enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition)
        return context.permute(2, 0, 1, 3)


class BmmAttention(_CausalFastPath):
    """Causal attention by ``CausalBmmAttention`` (the choice on CPU)."""

    def _causal(self, query, key, value, dropout: float):
        s, b, heads, d = query.shape
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if repeat > 1:  # grouped-query attention: each key/value head serves `repeat` query heads, as megatron
            key, value = key.repeat_interleave(repeat, dim=2), value.repeat_interleave(repeat, dim=2)
        # [s, b, heads, d] -> contiguous [b*heads, s, d] (reshape alone may return a strided view)
        q, k, v = (t.permute(1, 2, 0, 3).reshape(b * heads, s, d).contiguous() for t in (query, key, value))
        context = CausalBmmAttention.apply(q, k, v, self.softmax_scale, dropout)
        return context.view(b, heads, s, d).permute(2, 0, 1, 3)


KINDS = {"sdpa": SDPAttention, "bmm": BmmAttention, "local": DotProductAttention}


def core_attention_kind(model_cfg: ModelConfig, on_cuda: bool) -> str:
    """``model.attention`` resolved for this device: ``auto`` = ``sdpa`` on GPU, ``bmm`` on CPU."""
    if model_cfg.attention != "auto":
        return model_cfg.attention
    return "sdpa" if on_cuda else "bmm"

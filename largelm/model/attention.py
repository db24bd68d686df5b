"""Core attention for the layer spec: megatron's ``DotProductAttention`` computed by ``F.scaled_dot_product_attention``.

megatron-core's local spec computes attention unfused: ``baddbmm`` into a ``[b*n, s, s]`` score buffer, a masked
softmax, dropout, ``bmm``, with layout copies around them. ``SDPAttention`` keeps megatron's module (its
constructor: heads per TP partition, query groups, softmax scale, dropout probability) and replaces the
computation with torch's fused kernel (flash/memory-efficient on GPU, a blocked online-softmax kernel on CPU).
Same function: causal attention, scale ``1/sqrt(head_dim)``, grouped-query attention via ``enable_gqa``, attention
dropout under megatron's tensor-parallel RNG fork exactly as ``DotProductAttention`` applies it.

It handles what largelm's GPT uses - causal masks with no explicit mask tensor - and hands anything else (padding
masks, as BERT's, whose fully masked query rows megatron fills with a uniform softmax where SDPA gives NaN;
attention bias, packed sequences, sliding windows, softmax offsets, query-key layer scaling) to megatron's own
forward, so it is never wrong, only sometimes not faster.

``model.attention`` chooses (``use_sdpa``): ``auto`` = SDPA except bf16 on CPU, where torch's CPU SDPA backward is
slower than megatron's unfused path (bench/README.md: fp32 gpt-25m-shaped attention fwd+bwd 11.3 -> 7.8 ms with
SDPA, bf16 5.8 -> 13.4 ms); ``sdpa`` / ``local`` force one.
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from largelm.config import ModelConfig


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` whose causal, unmasked case runs ``F.scaled_dot_product_attention``."""

    def _sdpa_applies(self, attention_mask, attn_mask_type, attention_bias, packed_seq_params) -> bool:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return (mask_type == AttnMaskType.causal and attention_mask is None and attention_bias is None
                and packed_seq_params is None and self.softmax_offset is None
                and not self.config.apply_query_key_layer_scaling
                and self.scale_mask_softmax.window_size is None)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not self._sdpa_applies(attention_mask, attn_mask_type, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        sq, b = query.shape[0], query.shape[1]
        # [s, b, heads, d] -> [b, heads, s, d] (views; the kernel takes strided inputs)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.attention_dropout.p if self.training else 0.0
        # as DotProductAttention: dropout draws from the tensor-parallel RNG stream unless sequence parallel
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel
               else contextlib.nullcontext())
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=self.softmax_scale,
                enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition)
        # [b, heads, s, d] -> [s, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def use_sdpa(model_cfg: ModelConfig, bf16: bool, on_cuda: bool) -> bool:
    """Whether the layer spec's core attention is ``SDPAttention`` (see the module docstring)."""
    if model_cfg.attention != "auto":
        return model_cfg.attention == "sdpa"
    return on_cuda or not bf16


"""GPT on megatron-core: config -> TransformerConfig + local layer spec -> GPTModel (see docs/design.md)."""

from largelm.model.flops import flops_per_token, matmul_parameter_count, parameter_count
from largelm.model.gpt import build_gpt_model, gpt_forward_loss, resolve_vocab_size, split_tokens
from largelm.model.sequence_parallel import SequenceParallelNorm, reduce_sequence_parallel_grads_in_backward
from largelm.model.specs import (
    build_transformer_config,
    final_norm,
    gpt_block_spec,
    gpt_layer_spec,
    kernel_fusions,
    position_embedding_type,
)

__all__ = [
    "SequenceParallelNorm",
    "build_gpt_model",
    "build_transformer_config",
    "final_norm",
    "flops_per_token",
    "gpt_block_spec",
    "gpt_forward_loss",
    "gpt_layer_spec",
    "kernel_fusions",
    "matmul_parameter_count",
    "parameter_count",
    "position_embedding_type",
    "reduce_sequence_parallel_grads_in_backward",
    "resolve_vocab_size",
    "split_tokens",
]

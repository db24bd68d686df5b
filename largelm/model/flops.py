"""Parameter and FLOP accounting for throughput/MFU logging."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from largelm.config import ModelConfig
from largelm.parallel import groups


def parameter_count(model: torch.nn.Module, *, whole_model: bool = False) -> int:
    """Number of parameters, each shared tensor counted once.

    ``whole_model=False``: what this rank holds. ``whole_model=True``: the full model across all
    tensor- and pipeline-parallel ranks (a collective over the model-parallel group: call it on every
    rank). Then TP-sharded tensors (megatron marks them ``tensor_model_parallel``) count on each TP
    rank, TP-replicated ones (norms, row-parallel biases, position embeddings) only on TP rank 0, and
    the last pipeline stage's copy of tied embeddings (marked ``shared``) not at all.
    """
    unique = {id(p): p for p in model.parameters()}.values()
    if not whole_model:
        return sum(p.numel() for p in unique)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    local = 0
    for p in unique:
        if getattr(p, "shared", False):
            continue
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            local += p.numel()
    total = torch.tensor([local], dtype=torch.int64, device=groups.device())  # nccl needs a GPU tensor
    dist.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return int(total.item())


def _layer_matmul_parameters(model_cfg: ModelConfig) -> int:
    """Weights of one transformer layer's linears: QKV, attention output, MLP in (x2 for SwiGLU) and out."""
    h = model_cfg.hidden_size
    head_dim = h // model_cfg.num_attention_heads
    qkv = h * (h + 2 * model_cfg.kv_groups * head_dim)
    attn_out = h * h
    mlp_in = (2 if model_cfg.style == "llama" else 1) * h * model_cfg.ffn_size  # SwiGLU: gate and up
    mlp_out = model_cfg.ffn_size * h
    return qkv + attn_out + mlp_in + mlp_out


def matmul_parameter_count(model_cfg: ModelConfig, vocab_size: Optional[int] = None) -> int:
    """Weights that take part in a matmul per token: every linear layer plus the output (logit)
    projection (once, tied or not). Embedding lookups, norms and biases are left out (no matmul)."""
    vocab = vocab_size or model_cfg.padded_vocab_size()
    return model_cfg.num_layers * _layer_matmul_parameters(model_cfg) + vocab * model_cfg.hidden_size


def flops_per_token(model_cfg: ModelConfig, vocab_size: Optional[int] = None, seq_length: Optional[int] = None,
                    *, binary_head: bool = True) -> float:
    """Training FLOPs per token (forward + backward): ``6 * N + 12 * L * h * s``.

    * ``N`` = ``matmul_parameter_count`` (linear layers + output projection): each weight costs one
      multiply-add (2 FLOPs) per token forward and two backward (input and weight grads): 6 N.
    * ``12 * L * h * s``: attention scores ``Q K^T`` and ``softmax(.) V`` cost ``2 * s * h`` FLOPs
      each per token per layer forward (``h`` = heads x head_dim; GQA does not change it), so
      ``4 L h s`` forward and ``12 L h s`` with backward. The causal mask is not discounted (the
      common PaLM/Megatron convention), ``s`` = ``seq_length`` (default ``model_cfg.seq_length``).
    Activation recompute is not counted (this is model FLOPs, for MFU).

    ``model_cfg.arch == "bert"`` counts BERT instead: ``bert_flops_per_token`` (``binary_head`` applies there).
    """
    if model_cfg.arch == "bert":
        return bert_flops_per_token(model_cfg, vocab_size, seq_length, binary_head=binary_head)
    if model_cfg.arch == "moe":
        return moe_flops_per_token(model_cfg, vocab_size, seq_length)
    return gpt_flops_per_token(model_cfg, vocab_size, seq_length)


def gpt_flops_per_token(model_cfg: ModelConfig, vocab_size: Optional[int] = None,
                        seq_length: Optional[int] = None) -> float:
    """GPT training FLOPs per token: ``6 * N + 12 * L * h * s`` (see ``flops_per_token``)."""
    s = seq_length or model_cfg.seq_length
    n = matmul_parameter_count(model_cfg, vocab_size)
    return 6 * n + 12 * model_cfg.num_layers * model_cfg.hidden_size * s


def bert_flops_per_token(model_cfg: ModelConfig, vocab_size: Optional[int] = None, seq_length: Optional[int] = None,
                         *, binary_head: bool = True) -> float:
    """BERT training FLOPs per token (forward + backward), megatron-core's ``BertModel`` as built here:

    ``6 * (L * layer + h*h + V*h) + 12 * L * h * s + 6 * (h*h + 2*h) / s``

    * encoder: the same dense term as GPT (``layer`` = QKV + attention output + MLP weights, 6 FLOPs per weight
      per token) and attention ``12 L h s``: ``Q K^T`` and ``softmax(.) V`` over the *full* sequence - BERT's
      attention is bidirectional, so unlike GPT's causal attention nothing is over-counted here. Padding
      positions are computed like real ones (the padding mask only masks scores), so ``s`` is the full
      ``seq_length`` and every position counts as a token.
    * MLM head on every position (``BertModel`` applies it before any label selection): ``lm_head.dense``
      (``h*h``) and the vocabulary projection (``V*h``, tied or not; ``V`` = padded vocabulary).
    * pooler (``h*h``) and binary head (``2*h``) run once per sequence on ``[CLS]``: ``/ s`` per token (only
      with ``binary_head``). Embedding lookups, norms, biases, GeLU/softmax are left out, as for GPT.
    """
    h, L = model_cfg.hidden_size, model_cfg.num_layers
    s = seq_length or model_cfg.seq_length
    vocab = vocab_size or model_cfg.padded_vocab_size()
    dense = L * _layer_matmul_parameters(model_cfg) + h * h + vocab * h
    flops = 6 * dense + 12 * L * h * s
    if binary_head:
        flops += 6 * (h * h + 2 * h) / s
    return flops


def matmul_shapes(model_cfg: ModelConfig, tokens: int, tensor_parallel: int = 1,
                  vocab_size: Optional[int] = None) -> list[tuple[int, int, int]]:
    """The linears one rank applies to a micro-batch of ``tokens`` tokens, as ``(m, k, n)``: ``[m, k]`` inputs
    times a ``[n, k]`` weight - one transformer layer's QKV, attention output, MLP in and out, then the logit
    projection - the dimension tensor parallelism splits divided by ``tensor_parallel``. What the MFU peak is
    measured on (train/metrics)."""
    h, tp = model_cfg.hidden_size, tensor_parallel
    head_dim = h // model_cfg.num_attention_heads
    mlp_in = (2 if model_cfg.style == "llama" else 1) * model_cfg.ffn_size
    vocab = vocab_size or model_cfg.padded_vocab_size(tp)
    shapes = [(tokens, h, (h + 2 * model_cfg.kv_groups * head_dim) // tp), (tokens, h // tp, h),
              (tokens, h, mlp_in // tp), (tokens, model_cfg.ffn_size // tp, h), (tokens, h, vocab // tp)]
    moe = getattr(model_cfg, "moe", None)
    if moe is not None:  # an MoE layer's experts: each takes ~tokens x top_k / E of the (gathered) tokens
        routed = max(1, tokens * moe.top_k // moe.num_experts)
        shapes[2:4] = [(routed, h, 2 * moe.ffn_size // tp), (routed, moe.ffn_size // tp, h)]
    return shapes


def moe_matmul_parameter_count(model_cfg: ModelConfig, vocab_size: Optional[int] = None) -> int:
    """Weights *active* per token in an MoE GPT (``model.arch: moe``): attention and dense-layer MLPs as in
    ``matmul_parameter_count``; in an MoE layer the router (``h x E``), ``top_k`` experts' SwiGLU MLPs
    (``3 h f_e`` each) and the shared expert's (``3 h f_s``) instead of the dense MLP. Dropped tokens are not
    discounted (a dropless run drops none)."""
    moe = model_cfg.moe
    h = model_cfg.hidden_size
    dense_mlp = 3 * h * model_cfg.ffn_size  # SwiGLU: gate, up, down (MoE models are llama style)
    attention = _layer_matmul_parameters(model_cfg) - dense_mlp
    moe_mlp = h * moe.num_experts + moe.top_k * 3 * h * moe.ffn_size + 3 * h * (moe.shared_expert_ffn_size or 0)
    layers = sum(attention + (moe_mlp if moe.is_moe_layer(i) else dense_mlp) for i in range(model_cfg.num_layers))
    vocab = vocab_size or model_cfg.padded_vocab_size()
    return layers + vocab * h


def moe_flops_per_token(model_cfg: ModelConfig, vocab_size: Optional[int] = None,
                        seq_length: Optional[int] = None) -> float:
    """MoE GPT training FLOPs per token: ``6 * N_active + 12 * L * h * s`` (``moe_matmul_parameter_count``; the
    attention term as ``gpt_flops_per_token``)."""
    s = seq_length or model_cfg.seq_length
    return 6 * moe_matmul_parameter_count(model_cfg, vocab_size) + 12 * model_cfg.num_layers * model_cfg.hidden_size * s

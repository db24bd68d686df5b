"""Build a megatron-core GPTModel from largelm's config, and the one way to run it for a loss.

Calling convention (``gpt_forward_loss``): a batch is ``tokens`` LongTensor [b, s+1]. Inputs are
``tokens[:, :-1]``, labels ``tokens[:, 1:]``, ``position_ids`` = 0..s-1 and ``attention_mask`` None:
megatron's local attention is built with ``AttnMaskType.causal`` and makes the causal mask itself
(on CPU via largelm.parallel.cpu_compat). ``GPTModel.forward(..., labels=labels)`` returns the
per-token cross-entropy [b, s], computed on vocab-parallel logits, so the full-vocab logits are never
gathered. Padded-vocab entries are ordinary (trained-down) logits, as in Megatron.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from largelm.config import ConfigError, ModelConfig, ParallelConfig
from largelm.model.specs import build_transformer_config, gpt_block_spec, position_embedding_type
from largelm.parallel import groups
from largelm.parallel.cpu_compat import enable_cpu_compat
from largelm.parallel.sequence_parallel import reduce_sequence_parallel_grads_in_backward


def resolve_vocab_size(model_cfg: ModelConfig, tokenizer_vocab_size: Optional[int]) -> ModelConfig:
    """``model_cfg`` with ``vocab_size`` set: the config's value if given (it may reserve room beyond
    the tokenizer), else the tokenizer's."""
    configured = model_cfg.vocab_size
    if configured is None:
        if tokenizer_vocab_size is None:
            raise ConfigError("model.vocab_size is not set and no tokenizer vocab_size was given")
        return model_cfg.model_copy(update={"vocab_size": tokenizer_vocab_size})
    if tokenizer_vocab_size is not None and tokenizer_vocab_size > configured:
        raise ConfigError(
            f"model.vocab_size={configured} is smaller than the tokenizer's vocabulary ({tokenizer_vocab_size})"
        )
    return model_cfg


def build_gpt_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    *,
    vocab_size: Optional[int],
    dtype: torch.dtype = torch.float32,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    block_spec: Callable[..., Any] = gpt_block_spec,
    **config_overrides: Any,
) -> GPTModel:
    """This rank's GPTModel (its TP shard and, with ``pre_process``/``post_process``, its PP stage).

    Needs ``init_model_parallel`` first. ``vocab_size`` is the tokenizer's; the embedding/output
    size is ``model_cfg.padded_vocab_size(tensor_parallel)``. Parameters are created in ``dtype``
    on ``groups.device()`` (initialised on the CPU when there is no GPU). With sequence parallelism
    the TP gradient all-reduce of norm weights/row-parallel biases is hooked in here.
    ``config_overrides`` go to ``build_transformer_config`` (e.g. activation recompute settings).
    ``block_spec(model_cfg, config, vp_stage=)`` gives the layers: the dense GPT's, or another architecture's
    built on GPTModel (the MoE GPT, largelm/model/moe.py).
    """
    if model_cfg.arch != "gpt" and block_spec is gpt_block_spec:
        raise ConfigError(f"build_gpt_model builds model.arch='gpt', got {model_cfg.arch!r}")
    enable_cpu_compat()  # no-op with CUDA
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp != parallel_cfg.tensor_parallel:
        raise ConfigError(
            f"parallel.tensor_parallel={parallel_cfg.tensor_parallel} but megatron parallel_state was "
            f"initialised with {tp}"
        )
    tied = model_cfg.tie_embeddings
    if tied and parallel_cfg.pipeline_parallel > 1 and not torch.cuda.is_available():
        # megatron syncs the last stage's copy of tied embeddings with `weight.data.cuda()`.
        raise NotImplementedError("tied embeddings with pipeline_parallel > 1 need CUDA (megatron calls .cuda())")
    model_cfg = resolve_vocab_size(model_cfg, vocab_size)
    config = build_transformer_config(model_cfg, parallel_cfg, dtype, **config_overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(model_cfg, config, vp_stage=vp_stage),
        vocab_size=model_cfg.padded_vocab_size(tp),
        max_sequence_length=model_cfg.positions,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=tied,
        position_embedding_type=position_embedding_type(model_cfg),
        rotary_base=model_cfg.rotary_base,
        vp_stage=vp_stage,
    )
    # megatron's torch norms are created on the CPU in fp32 whatever params_dtype says (and off a GPU
    # everything is on the CPU); megatron's training loop moves the model to the device and casts it
    # whole (Float16Module) the same way.
    model.to(device=groups.device(), dtype=dtype)
    if config.sequence_parallel:
        reduce_sequence_parallel_grads_in_backward(model)
    return model


def split_tokens(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[b, s+1] tokens -> (input_ids [b, s], labels [b, s], position_ids [b, s])."""
    if tokens.dim() != 2 or tokens.size(1) < 2:
        raise ValueError(f"tokens must be [batch, seq+1] with seq >= 1, got shape {tuple(tokens.shape)}")
    input_ids = tokens[:, :-1].contiguous()
    labels = tokens[:, 1:].contiguous()
    position_ids = torch.arange(input_ids.size(1), device=tokens.device).unsqueeze(0).expand_as(input_ids)
    return input_ids, labels, position_ids


def gpt_forward_loss(
    model: torch.nn.Module, tokens: torch.Tensor, loss_mask: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss of a full (single pipeline stage) GPTModel.

    ``tokens`` LongTensor [b, s+1] (moved to the model's device). Returns ``(per_token_loss [b, s]
    fp32, mean_loss)``; the mean is over positions where ``loss_mask`` [b, s] is nonzero (all by
    default). ``model`` may be a wrapper (e.g. a DeepSpeed engine) whose forward is GPTModel's.
    """
    param = next(model.parameters())
    input_ids, labels, position_ids = split_tokens(tokens.to(param.device))
    per_token = model(input_ids, position_ids, None, labels=labels).float()
    if loss_mask is None:
        return per_token, per_token.mean()
    loss_mask = loss_mask.to(per_token.device, torch.float32)
    return per_token, (per_token * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


# --- what the step drivers and the registry call (largelm/model/registry.py) ----------------------------------
def gpt_forward_metrics(model: torch.nn.Module, batch: dict, cfg=None) -> dict[str, torch.Tensor]:
    """``{"loss": mean next-token loss}`` of a ``tokens`` batch (``gpt_forward_loss``); ``cfg`` is unused."""
    return {"loss": gpt_forward_loss(model, batch["tokens"])[1]}


def gpt_pipeline_micro_batch(batch: dict) -> tuple[tuple[torch.Tensor], torch.Tensor]:
    """A ``tokens`` batch as DeepSpeed's pipeline takes it: ``((input_ids,), labels)``."""
    input_ids, labels, _ = split_tokens(batch["tokens"])
    return (input_ids,), labels


class CausalLMProbe:
    """How a conversion's verification (largelm.convert.verify) runs a GPT on a token batch [b, s] (no shift: the
    ids are the inputs): the dense model, each pipeline stage (hidden [s, b, h] between stages), and a
    ``transformers`` causal LM. Outputs are logits; ``finish`` turns them into what is compared."""

    def dense(self, module: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
        position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        return module(tokens, position_ids, None), None  # [b, s, V/tp]

    def first_stage_input(self, tokens: torch.Tensor):
        return (tokens,)

    def stage_input(self, hidden: torch.Tensor, tokens: torch.Tensor):
        return hidden

    def stage_hidden(self, out) -> torch.Tensor:
        return out

    def last_stage_outputs(self, out) -> tuple[torch.Tensor, None]:
        return out, None  # [s, b, V/tp]

    def finish(self, logits: torch.Tensor, extra, tokens: torch.Tensor):
        return logits

    def hf_auto_class(self, hf_cfg) -> str:
        return "AutoModelForCausalLM"

    def hf_forward(self, model, tokens: torch.Tensor):
        return model(input_ids=tokens.long()).logits.float()

"""BERT on megatron-core: its own ``BertModel`` with the local (no Transformer Engine) layer spec.

``build_bert_model`` builds megatron-core 0.16.1's ``megatron.core.models.bert.bert_model.BertModel`` from
``bert_layer_spec`` (largelm/model/bert_layers.py: megatron's ``bert_layer_local_spec``, pre-LN layers with
``AttnMaskType.padding``: ``ColumnParallelLinear`` / ``RowParallelLinear``, ``DotProductAttention``, torch
LayerNorm; or with ``bert.residual_post_layernorm`` the original post-LN BERT), two token types, learned absolute
positions, the MLM head (``lm_head``: dense + GeLU + LayerNorm, then ``output_layer`` with the word embedding as
its weight when tied, plus a vocab-parallel bias) and the binary (SOP/NSP) head on the pooled [CLS] state. It runs on
CPU under ``largelm.parallel.cpu_compat`` with no further patch (the padding mask is built by BertModel on the input's
device). Parameter names are megatron's (``embedding.{word,position,tokentype}_embeddings``,
``encoder.layers.N.*``, ``encoder.final_layernorm``, ``lm_head.{dense,layer_norm}``, ``output_layer.bias``,
``pooler.dense``, ``binary_head``): the layout Megatron-LM's BERT checkpoint converters read.

``bert_forward_metrics(model, batch)`` is the one way to run it for a loss: a batch from the loader with a
``BertMasker`` transform (``input_ids``, ``token_type_ids``, ``attention_mask``, ``mlm_labels`` with -100 on
unmasked positions, ``pair_label``). The MLM loss is vocab-parallel cross entropy on the vocab-parallel logits
(never gathered), averaged over masked positions; the accuracy uses a vocab-parallel argmax. The pair loss is
cross entropy of the binary head. ``loss = mlm_loss + pair_loss`` (Megatron's BERT loss). The computation from
the outputs is ``bert_metrics_from_logits``, shared with the pipeline-parallel BERT's last stage
(``largelm.model.bert_pipeline``, used for ``parallel.pipeline_parallel > 1``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.bert.bert_model import BertModel

from largelm.config import BertConfig, Config, ConfigError, ModelConfig, ParallelConfig
from largelm.data.bert_masking import BertMasker
from largelm.model.bert_layers import bert_layer_spec
from largelm.model.gpt import resolve_vocab_size
from largelm.model.specs import build_transformer_config
from largelm.parallel import groups
from largelm.parallel.cpu_compat import enable_cpu_compat
from largelm.parallel.megatron_compat import bert_norms
from largelm.parallel.sequence_parallel import reduce_sequence_parallel_grads_in_backward
from largelm.tokenizer import Tokenizer

IGNORE_INDEX = -100  # = largelm.data.bert_masking.IGNORE_INDEX


def build_bert_model(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    bert_cfg: Optional[BertConfig] = None,
    *,
    vocab_size: Optional[int],
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> BertModel:
    """This rank's ``BertModel`` (its TP shard). Needs ``init_model_parallel`` first; see ``build_gpt_model``."""
    if model_cfg.arch != "bert":
        raise ConfigError(f"build_bert_model builds model.arch='bert', got {model_cfg.arch!r}")
    if parallel_cfg.pipeline_parallel > 1:
        raise ConfigError("build_bert_model builds a single pipeline stage; parallel.pipeline_parallel > 1 uses "
                          "largelm.model.bert_pipeline.build_bert_pipeline")
    bert_cfg = bert_cfg or BertConfig()
    enable_cpu_compat()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp != parallel_cfg.tensor_parallel:
        raise ConfigError(f"parallel.tensor_parallel={parallel_cfg.tensor_parallel} but megatron parallel_state "
                          f"was initialised with {tp}")
    model_cfg = resolve_vocab_size(model_cfg, vocab_size)
    config = build_transformer_config(model_cfg, parallel_cfg, dtype, **config_overrides)
    with bert_norms(config.sequence_parallel):
        model = BertModel(
            config=config,
            num_tokentypes=2,
            transformer_layer_spec=bert_layer_spec(bert_cfg.residual_post_layernorm, config.sequence_parallel),
            vocab_size=model_cfg.padded_vocab_size(tp),
            max_sequence_length=model_cfg.positions,
            share_embeddings_and_output_weights=model_cfg.tie_embeddings,
            position_embedding_type="learned_absolute",
            add_binary_head=bert_cfg.binary_head,
        )
    model.to(device=groups.device(), dtype=dtype)  # norms and the non-TP linears are created in fp32 on the CPU
    if config.sequence_parallel:
        reduce_sequence_parallel_grads_in_backward(model)
    return model


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the full vocabulary of vocab-parallel logits [..., V/tp] (lowest id on ties, like torch)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    local_max, local_arg = logits.max(dim=-1)
    if tp == 1:
        return local_arg
    group = parallel_state.get_tensor_model_parallel_group()
    offset = parallel_state.get_tensor_model_parallel_rank() * logits.size(-1)
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    big = torch.iinfo(torch.long).max
    candidate = torch.where(local_max == global_max, local_arg + offset, torch.full_like(local_arg, big))
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
    return candidate


def bert_forward_metrics(model: torch.nn.Module, batch: dict, pair_name: str = "sop") -> dict[str, torch.Tensor]:
    """Losses and accuracies of one masked batch (see the module docstring); ``loss`` carries the gradient.

    Returns fp32 scalars ``loss``, ``mlm_loss``, ``mlm_acc`` and, with a binary head, ``<pair_name>_loss`` and
    ``<pair_name>_acc`` (``sop_*`` / ``nsp_*``).
    ``model`` may be a wrapper (e.g. a DeepSpeed engine) whose forward is BertModel's.
    """
    device = next(model.parameters()).device
    logits, binary_logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                  tokentype_ids=batch["token_type_ids"].to(device))
    pair_label = batch["pair_label"].to(device) if binary_logits is not None else None
    return bert_metrics_from_logits(logits, binary_logits, batch["mlm_labels"].to(device), pair_label, pair_name)


def bert_metrics_from_logits(logits: torch.Tensor, binary_logits: Optional[torch.Tensor], labels: torch.Tensor,
                             pair_label: Optional[torch.Tensor], pair_name: str = "sop") -> dict[str, torch.Tensor]:
    """The BERT losses and accuracies from the model's outputs (shared by ``bert_forward_metrics`` and the
    pipeline's last stage, ``largelm.model.bert_pipeline``).

    ``logits`` [b, s, V/tp] (vocab-parallel, as ``BertModel`` returns them), ``binary_logits`` [b, 2] or None,
    ``labels`` [b, s] with ``IGNORE_INDEX`` on unmasked positions, ``pair_label`` [b].
    """
    masked = labels != IGNORE_INDEX
    weight = masked.float()
    count = weight.sum().clamp(min=1.0)
    logits = logits.float()
    with torch.no_grad():  # before the cross entropy: megatron's works in place on the logits it is given
        predicted = vocab_parallel_argmax(logits)
        mlm_acc = ((predicted == labels) & masked).float().sum() / count
    safe_labels = torch.where(masked, labels, torch.zeros_like(labels))  # any valid id; weight 0 below
    per_token = tensor_parallel.vocab_parallel_cross_entropy(logits, safe_labels)
    mlm_loss = (per_token * weight).sum() / count
    out = {"loss": mlm_loss, "mlm_loss": mlm_loss.detach(), "mlm_acc": mlm_acc}
    if binary_logits is not None:
        pair_loss = F.cross_entropy(binary_logits.float(), pair_label)
        out["loss"] = mlm_loss + pair_loss
        out[f"{pair_name}_loss"] = pair_loss.detach()
        out[f"{pair_name}_acc"] = (binary_logits.argmax(dim=-1) == pair_label).float().mean()
    return out


# --- what the step drivers, the loader and the registry call (largelm/model/registry.py) -----------------------
def bert_step_metrics(model: torch.nn.Module, batch: dict, cfg: Config) -> dict[str, torch.Tensor]:
    """``bert_forward_metrics`` with the config's pair objective (``sop_*`` / ``nsp_*`` names)."""
    return bert_forward_metrics(model, batch, cfg.bert.objective)


def bert_pipeline_micro_batch(batch: dict) -> tuple[tuple, tuple]:
    """A masked batch as DeepSpeed's pipeline takes it: inputs to the first stage, labels to the last."""
    return ((batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]),
            (batch["mlm_labels"], batch["pair_label"]))


def bert_loader_kwargs(cfg: Config) -> dict:
    """Loader arguments for BERT's samples: sentence pairs, masked in the loader's workers."""
    b = cfg.bert
    masker = BertMasker.from_tokenizer(
        Tokenizer.load(cfg.tokenizer.model), cfg.model.seq_length, seed=cfg.data.seed,
        mask_prob=b.mask_prob, mask_token_prob=b.mask_token_prob, random_token_prob=b.random_token_prob,
        whole_word_masking=b.whole_word_masking)
    return {"kind": "bert_pairs", "sample_transform": masker}


def bert_inputs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token_type_ids, attention_mask) of the BERT verification batch (largelm.convert.verify): token type 1 on
    the second half of each sequence, padding (mask 0) on the last quarter of the second sequence; 1 = attend."""
    b, s = tokens.shape
    types = torch.zeros(b, s, dtype=torch.long)
    types[:, s // 2:] = 1
    mask = torch.ones(b, s, dtype=torch.long)
    if b > 1:
        mask[1, s - s // 4:] = 0
    return types, mask


def drop_padded(mlm_logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """MLM logits [b, s, V] with padded positions (mask 0) zeroed: megatron masks padded *queries* too,
    transformers only padded keys, and no loss or prediction reads those positions."""
    return mlm_logits * attention_mask.to(mlm_logits.dtype).unsqueeze(-1)


class BertProbe:
    """How a conversion's verification runs BERT on a token batch [b, s] (see ``CausalLMProbe``, largelm/model/
    gpt.py): on ``bert_inputs(tokens)``; the outputs are (MLM logits with padded positions zeroed, binary-head
    logits or None). Pipeline stages pass (hidden, attention mask) and end with (logits, binary logits)."""

    def dense(self, module: torch.nn.Module, tokens: torch.Tensor):
        types, mask = bert_inputs(tokens)
        return module(tokens, mask, tokentype_ids=types)  # [b, s, V/tp], [b, 2] or None

    def first_stage_input(self, tokens: torch.Tensor):
        types, mask = bert_inputs(tokens)
        return tokens, mask, types

    def stage_input(self, hidden: torch.Tensor, tokens: torch.Tensor):
        return hidden, bert_inputs(tokens)[1]

    def stage_hidden(self, out) -> torch.Tensor:
        return out[0]

    def last_stage_outputs(self, out):
        return out

    def finish(self, logits: torch.Tensor, binary, tokens: torch.Tensor):
        return drop_padded(logits, bert_inputs(tokens)[1]), None if binary is None else binary.float()

    def hf_auto_class(self, hf_cfg) -> str:
        pretraining = any(a.endswith("ForPreTraining") for a in hf_cfg.architectures or [])
        return "AutoModelForPreTraining" if pretraining else "AutoModelForMaskedLM"

    def hf_forward(self, model, tokens: torch.Tensor):
        types, mask = bert_inputs(tokens)
        out = model(input_ids=tokens.long(), token_type_ids=types, attention_mask=mask)
        if hasattr(out, "prediction_logits"):  # a ...ForPreTraining class
            return drop_padded(out.prediction_logits.float(), mask), out.seq_relationship_logits.float()
        return drop_padded(out.logits.float(), mask), None

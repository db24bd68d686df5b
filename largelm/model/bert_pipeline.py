"""BERT as a DeepSpeed PipelineModule of megatron-core blocks (``parallel.pipeline_parallel > 1``).

Built like the GPT pipeline (``largelm.model.pipeline``, the GPT-NeoX / Megatron-DeepSpeed design) from the same
modules ``BertModel`` (``largelm.model.bert``) is made of, so every stage computes what the single-stage model
computes (tested to fp32 round-off in tests/test_bert_pipeline.py). The layer list:

* 0: ``BertEmbeddingPipe`` - megatron's ``LanguageModelEmbedding`` with 2 token types (tied: ``TiedLayerSpec``);
  ``embedding.*``.
* 1..L: ``BertLayerPipe`` - one layer of ``bert_layer_spec(bert.residual_post_layernorm)``;
  ``encoder.layers.{i-1}.*`` as ``layer.*``.
* L+1: ``BertFinalNormPipe`` - the encoder's final LayerNorm (megatron's ``LayerNormImpl``);
  ``encoder.final_layernorm.*`` as ``norm.*``.
* L+2: ``BertHeadPipe`` - megatron's ``BertLMHead``, ``Pooler`` and binary head; ``lm_head.*``, ``pooler.*``,
  ``binary_head.*``.
* L+3: the output projection - tied: ``OutputEmbeddingPipe`` (the last stage's copy of the word embedding,
  ``embedding.word_embeddings.weight``) applied by ``BertTiedProjection``; untied: ``BertOutputPipe``
  (``output_layer.weight``).
* L+4: ``BertOutputBiasPipe`` - the vocab-parallel output bias, ``output_layer.bias``.

``BertModel``'s output layer (a ``ColumnParallelLinear`` with bias) is split into L+3 (matmul) and L+4 (``+ bias``),
which is what the fused layer computes (``matmul`` then ``+ bias``): the tied weight must live in a tied module,
whose other parameters DeepSpeed would neither sync nor checkpoint, so the bias gets its own layer.

What crosses stages: the first stage takes ``(input_ids, attention_mask, token_type_ids)`` ([b, s] integer
tensors; the token types are consumed by the embedding), every transformer stage passes ``(hidden [s, b, h],
attention_mask [b, s])`` on - the integer padding mask has no gradient, DeepSpeed sends it alongside the
activation - and each layer expands it to megatron's ``[b, 1, s, s]`` boolean mask exactly as
``BertModel.bert_extended_attention_mask`` does. The last stage outputs ``(logits [s, b, V/tp], binary_logits)``
and ``BertPipelineLoss`` computes ``bert_metrics_from_logits`` (the dense model's loss and accuracies) on them
against the labels ``(mlm_labels, pair_label)``, keeping the per-micro-batch metrics for the step driver to log.
"""

from __future__ import annotations

from typing import Optional

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.bert.bert_lm_head import BertLMHead
from megatron.core.models.bert.pooler import Pooler
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer import transformer_block
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.utils import get_linear_layer

from largelm.config import BertConfig, ConfigError, ModelConfig, ParallelConfig
from largelm.model.bert import bert_metrics_from_logits
from largelm.model.bert_layers import bert_layer_spec
from largelm.model.pipeline import (
    TIED_ATTR,
    TIED_KEY,
    GPTPipelineModule,
    OutputEmbeddingPipe,
    embedding_layer,
    finish_stage,
    pipeline_topology,
    stage_config,
)
from largelm.model.pipeline_names import BERT_HEADS, pipeline_name_to_dense
from largelm.model.specs import checkpointed_layer_call
from largelm.parallel.cpu_compat import enable_cpu_compat
from largelm.parallel.megatron_compat import bert_norms

HEAD_PREFIXES = BERT_HEADS[0]


def extended_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, s] padding mask (1 = token) -> [b, 1, s, s] bool, True = masked: ``BertModel``'s ``b1ss`` mask."""
    return (attention_mask.unsqueeze(1) * attention_mask.unsqueeze(2)).unsqueeze(1) < 0.5


class BertEmbeddingPipe(torch.nn.Module):
    """``(input_ids, attention_mask, token_type_ids)`` -> ``(hidden [s, b, h], attention_mask)``; the module (and
    the names under ``embedding.``) of ``BertModel.embedding``."""

    def __init__(self, config, model_cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.embedding = LanguageModelEmbedding(config, vocab_size=vocab_size,
                                                max_sequence_length=model_cfg.positions,
                                                position_embedding_type="learned_absolute", num_tokentypes=2)

    @property
    def word_embeddings_weight(self) -> torch.Tensor:
        return self.embedding.word_embeddings.weight

    def forward(self, inputs):
        if not isinstance(inputs, (tuple, list)) or len(inputs) != 3:
            raise ValueError("the first BERT pipeline stage takes (input_ids, attention_mask, token_type_ids)")
        input_ids, attention_mask, token_type_ids = inputs
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        hidden = self.embedding(input_ids=input_ids, position_ids=positions, tokentype_ids=token_type_ids)
        return hidden, attention_mask


class BertLayerPipe(torch.nn.Module):
    """One megatron ``TransformerLayer`` of the BERT spec: ``(hidden, attention_mask)`` -> the same.

    ``layer_number`` is 1-based within the stage; megatron adds the stage offset (checked at build, as for GPT).
    """

    def __init__(self, config, layer_spec, layer_number: int):
        super().__init__()
        self.layer = build_module(layer_spec, config=config, layer_number=layer_number)
        self.config = config

    def forward(self, inputs):
        hidden, attention_mask = inputs
        return checkpointed_layer_call(self.config, self._forward, hidden, attention_mask), attention_mask

    def _forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.layer(hidden_states=hidden, attention_mask=extended_attention_mask(attention_mask),
                            rotary_pos_emb=None)
        return out


class BertFinalNormPipe(torch.nn.Module):
    """``BertModel.encoder.final_layernorm`` (the block's ``LayerNormImpl``; parameters under ``norm.``):
    ``(hidden, attention_mask)`` -> hidden."""

    def __init__(self, config):
        super().__init__()
        self.norm = build_module(transformer_block.LayerNormImpl, config=config, hidden_size=config.hidden_size,
                                 eps=config.layernorm_epsilon)

    def forward(self, inputs):
        hidden, _ = inputs
        return self.norm(hidden)


class BertHeadPipe(torch.nn.Module):
    """megatron's ``BertLMHead`` (``lm_head``) and, with a binary head, ``Pooler`` (``pooler``) + ``binary_head``:
    hidden [s, b, h] -> ``(lm_hidden [s, b, h], binary_logits [b, 2] or None)``."""

    def __init__(self, config, binary_head: bool):
        super().__init__()
        self.lm_head = BertLMHead(config.hidden_size, config)
        self.has_binary_head = binary_head
        if binary_head:
            self.binary_head = get_linear_layer(config.hidden_size, 2, config.init_method,
                                                config.perform_initialization)
            self.pooler = Pooler(config.hidden_size, config.init_method, config, config.sequence_parallel)

    def forward(self, hidden: torch.Tensor):
        binary_logits = self.binary_head(self.pooler(hidden, 0)) if self.has_binary_head else None
        return self.lm_head(hidden_states=hidden), binary_logits


def _projection(config, vocab_size: int, **kwargs) -> tensor_parallel.ColumnParallelLinear:
    return tensor_parallel.ColumnParallelLinear(config.hidden_size, vocab_size, config=config,
                                                init_method=config.init_method, bias=False, skip_bias_add=False,
                                                gather_output=False, **kwargs)


class BertOutputPipe(torch.nn.Module):
    """Untied output weight (``output_layer.weight``): ``(lm_hidden, binary)`` -> ``(logits without bias, binary)``."""

    def __init__(self, config, vocab_size: int):
        super().__init__()
        self.output_layer = _projection(config, vocab_size)

    def forward(self, inputs):
        hidden, binary_logits = inputs
        logits, _ = self.output_layer(hidden)
        return logits, binary_logits


class BertTiedProjection:
    """Tied output weight: projects onto the tied module's word embedding (a plain callable, no parameters)."""

    def __init__(self, config, vocab_size: int):
        self.projection = _projection(config, vocab_size, skip_weight_param_allocation=True)

    def __call__(self, embedding, inputs):
        hidden, binary_logits = inputs
        logits, _ = self.projection(hidden, weight=embedding.word_embeddings_weight)
        return logits, binary_logits


class _VocabParallelBias(torch.nn.Module):
    def __init__(self, config, vocab_size: int):
        super().__init__()
        per_rank = vocab_size // parallel_state.get_tensor_model_parallel_world_size()
        # as ColumnParallelLinear's bias: zero-initialised, sharded along the vocabulary
        self.bias = torch.nn.Parameter(torch.zeros(per_rank, dtype=config.params_dtype))
        tensor_parallel.set_tensor_model_parallel_attributes(self.bias, True, 0, 1)


class BertOutputBiasPipe(torch.nn.Module):
    """``output_layer.bias`` (vocab-parallel): ``(logits, binary)`` -> ``(logits + bias, binary)``."""

    def __init__(self, config, vocab_size: int):
        super().__init__()
        self.output_layer = _VocabParallelBias(config, vocab_size)

    def forward(self, inputs):
        logits, binary_logits = inputs
        return logits + self.output_layer.bias, binary_logits


class BertPipelineLoss:
    """The pipeline's loss function (last stage): ``bert_metrics_from_logits`` on ``(logits [s, b, V/tp],
    binary_logits)`` and labels ``(mlm_labels, pair_label)``; returns the loss and appends the micro-batch's
    detached metrics to ``records`` (the step driver clears and reads them)."""

    def __init__(self, pair_name: str):
        self.pair_name = pair_name
        self.records: list[dict[str, torch.Tensor]] = []

    def __call__(self, outputs, labels):
        logits, binary_logits = outputs
        mlm_labels, pair_label = labels
        out = bert_metrics_from_logits(logits.transpose(0, 1).contiguous(), binary_logits, mlm_labels,
                                       pair_label if binary_logits is not None else None, self.pair_name)
        self.records.append({k: v.detach().float() for k, v in out.items()})
        return out["loss"]


class BertPipelineModule(GPTPipelineModule):
    """The BERT layer list (module docstring) with the name mapping ``load_full_state_dict`` uses."""

    binary_head: bool
    metric_names: list[str]

    @property
    def tied_output_index(self) -> int:
        return self.num_transformer_layers + 3

    def full_name_targets(self, name: str) -> list[tuple[int, str]]:
        targets = [bert_pipeline_layer_index(name, self.num_transformer_layers, self.tied)]
        if self.tied and name == "embedding.word_embeddings.weight":
            targets.append((self.tied_output_index, "word_embeddings.weight"))
        return targets


def build_bert_pipeline(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, bert_cfg: Optional[BertConfig] = None,
                        *, vocab_size: Optional[int] = None, dtype: torch.dtype = torch.float32,
                        activation_checkpointing: str = "none",
                        module_cls: type = BertPipelineModule) -> BertPipelineModule:
    """This rank's pipeline stage of BERT. Needs ``init_model_parallel`` (megatron parallel_state, TP x PP).
    ``module_cls``: a ``BertPipelineModule`` subclass to build (distillation's student,
    largelm/model/pipeline_distill.py)."""
    if model_cfg.arch != "bert":
        raise ConfigError(f"build_bert_pipeline builds model.arch='bert', got {model_cfg.arch!r}")
    bert_cfg = bert_cfg or BertConfig()
    enable_cpu_compat()
    model_cfg, config, padded, per_stage = stage_config(model_cfg, parallel_cfg, vocab_size, dtype,
                                                       activation_checkpointing)
    spec = bert_layer_spec(bert_cfg.residual_post_layernorm, config.sequence_parallel)
    L, tied = model_cfg.num_layers, model_cfg.tie_embeddings
    layers: list = []
    layers.append(embedding_layer(BertEmbeddingPipe, tied, config, model_cfg, padded))
    layers += [LayerSpec(BertLayerPipe, config, spec, i % per_stage + 1) for i in range(L)]
    layers.append(LayerSpec(BertFinalNormPipe, config))
    layers.append(LayerSpec(BertHeadPipe, config, bert_cfg.binary_head))
    if tied:
        layers.append(TiedLayerSpec(TIED_KEY, OutputEmbeddingPipe, config, padded,
                                    forward_fn=BertTiedProjection(config, padded), tied_weight_attr=[TIED_ATTR]))
    else:
        layers.append(LayerSpec(BertOutputPipe, config, padded))
    layers.append(LayerSpec(BertOutputBiasPipe, config, padded))

    topology = pipeline_topology(parallel_cfg)
    loss = BertPipelineLoss(bert_cfg.objective)
    # no_grad: the constructor broadcasts the tied weight in place (see build_gpt_pipeline)
    with torch.no_grad(), bert_norms(config.sequence_parallel):
        module = module_cls(layers=layers, loss_fn=loss, topology=topology, partition_method="type:BertLayerPipe",
                            activation_checkpoint_interval=0)
    module.num_transformer_layers, module.tied, module.binary_head = L, tied, bert_cfg.binary_head
    module.metric_names = ["loss", "mlm_loss", "mlm_acc"] + (
        [f"{bert_cfg.objective}_loss", f"{bert_cfg.objective}_acc"] if bert_cfg.binary_head else [])
    return finish_stage(module, config, dtype)


def bert_pipeline_layer_index(name: str, num_layers: int, tied: bool) -> tuple[int, str]:
    """A ``BertModel`` state-dict key -> (pipeline layer index, key inside that layer's module).

    For tied models ``embedding.word_embeddings.weight`` lives in layer 0 *and* (as ``word_embeddings.weight``)
    in layer L+3; this returns the first.
    """
    if name.startswith("embedding."):
        return 0, name
    if name.startswith("encoder.layers."):
        idx, sub = name[len("encoder.layers."):].split(".", 1)
        if not 0 <= int(idx) < num_layers:
            raise KeyError(f"{name}: layer {idx} is out of range for {num_layers} layers")
        return int(idx) + 1, "layer." + sub
    if name.startswith("encoder.final_layernorm."):
        return num_layers + 1, "norm." + name[len("encoder.final_layernorm."):]
    if name.startswith(HEAD_PREFIXES):
        return num_layers + 2, name
    if name == "output_layer.weight":
        if tied:
            raise KeyError(f"{name}: tied models have no separate output weight")
        return num_layers + 3, name
    if name == "output_layer.bias":
        return num_layers + 4, name
    raise KeyError(f"{name}: not a BertModel parameter this pipeline knows")


def pipeline_name_to_bert(name: str, num_layers: int) -> str:
    """A ``BertPipelineModule`` parameter name (``<layer index>.<key>`` or ``tied_modules.word_embeddings.<key>``)
    -> the ``BertModel`` name of the same tensor. The last stage's tied copy of the word embedding maps to
    ``embedding.word_embeddings.weight`` too. ``KeyError`` for a name that does not fit ``num_layers`` layers."""
    return pipeline_name_to_dense(name, num_layers, "encoder", BERT_HEADS)

"""GPT as a DeepSpeed PipelineModule built from megatron-core blocks (the GPT-NeoX / Megatron-DeepSpeed design).

The layer list is: embedding, ``num_layers`` transformer layers, final norm, output head. DeepSpeed partitions it
over pipeline stages (transformer layers balanced, so stage ``k`` holds layers ``k*L/PP .. (k+1)*L/PP - 1``, the
same split as megatron's; embedding on the first stage, final norm and head on the last), runs the 1F1B schedule,
and - for tied embeddings - keeps the first stage's word embedding and the last stage's output weight equal
(``TiedLayerSpec``: broadcast from the first stage at start and after loading a checkpoint, gradients all-reduced
between the two stages before every optimizer step).

Inside each layer the tensor-parallel building blocks are megatron-core's (same layer spec as ``GPTModel``), so
TP and sequence parallelism work unchanged and every piece computes what ``GPTModel`` computes (tested to fp32
round-off against the single-rank model in tests/test_parallel_parity.py). Activations cross stages as
``[s, b, h]`` tensors, ``[s/tp, b, h]`` under sequence parallelism.

Parameter names: layer ``i`` of the list is registered as module ``str(i)`` (DeepSpeed's convention; its
checkpoint files are ``layer_{i:02d}-model_{tp:02d}-model_states.pt``), tied modules under ``tied_modules``.
``pipeline_layer_index`` maps a ``GPTModel`` state-dict key to (layer index, key inside that layer);
``largelm.model.weights.load_full_state_dict`` uses it to load full (TP=1) weights into any layout.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from largelm.config import ConfigError, ModelConfig, ParallelConfig
from largelm.model.gpt import resolve_vocab_size
from largelm.model.pipeline_names import TIED_KEY
from largelm.model.specs import (
    attention_choice,
    build_transformer_config,
    checkpointed_layer_call,
    final_norm,
    gpt_layer_spec,
    position_embedding_type,
    recompute_fields,
)
from largelm.parallel import groups
from largelm.parallel.cpu_compat import enable_cpu_compat
from largelm.parallel.sequence_parallel import reduce_sequence_parallel_grads_in_backward

TIED_ATTR = "word_embeddings_weight"


def _input_ids(inputs) -> torch.Tensor:
    # DeepSpeed hands the first stage the micro-batch's first element as it was given: ``(input_ids,)``.
    if isinstance(inputs, (tuple, list)):
        if len(inputs) != 1:
            raise ValueError(f"the first pipeline stage takes (input_ids,), got {len(inputs)} tensors")
        return inputs[0]
    return inputs


class EmbeddingPipe(torch.nn.Module):
    """Stage input: token ids [b, s] -> hidden [s, b, h] (scattered over TP ranks under sequence parallelism).

    Same module (and parameter names under ``embedding.``) as ``GPTModel.embedding``.
    """

    def __init__(self, config, model_cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.embedding = LanguageModelEmbedding(config, vocab_size=vocab_size,
                                                max_sequence_length=model_cfg.positions,
                                                position_embedding_type=position_embedding_type(model_cfg))

    @property
    def word_embeddings_weight(self) -> torch.Tensor:
        return self.embedding.word_embeddings.weight

    def forward(self, inputs) -> torch.Tensor:
        input_ids = _input_ids(inputs)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        return self.embedding(input_ids=input_ids, position_ids=positions)


class OutputEmbeddingPipe(torch.nn.Module):
    """The last stage's copy of the tied word embedding: only the [V/tp, h] weight (no position embeddings),
    registered under the same tied key so DeepSpeed syncs it with the first stage's ``EmbeddingPipe``."""

    def __init__(self, config, vocab_size: int):
        super().__init__()
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            num_embeddings=vocab_size, embedding_dim=config.hidden_size, init_method=config.embedding_init_method,
            config=config)
        # megatron's mark for the last stage's copy of a tied embedding: parameter_count(whole_model=True) skips it
        self.word_embeddings.weight.shared = True

    @property
    def word_embeddings_weight(self) -> torch.Tensor:
        return self.word_embeddings.weight

    def forward(self, *_):  # only used through TiedHead
        raise RuntimeError("OutputEmbeddingPipe is applied through TiedHead")


class TransformerLayerPipe(torch.nn.Module):
    """One megatron-core TransformerLayer; rotary embeddings (no parameters) are recomputed per layer.

    ``layer_number`` is 1-based *within the stage*: megatron adds the stage's offset
    (``get_transformer_layer_offset``), which equals DeepSpeed's balanced split; ``build_gpt_pipeline`` checks it.
    """

    def __init__(self, config, model_cfg: ModelConfig, layer_spec, layer_number: int):
        super().__init__()
        self.layer = build_module(layer_spec, config=config, layer_number=layer_number)
        self.rotary = (RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                       rotary_interleaved=config.rotary_interleaved,
                                       rotary_base=model_cfg.rotary_base,
                                       use_cpu_initialization=config.use_cpu_initialization)
                       if position_embedding_type(model_cfg) == "rope" else None)
        self.sequence_parallel = config.sequence_parallel
        self.config = config

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return checkpointed_layer_call(self.config, self._forward, hidden)

    def _forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rotary = None
        if self.rotary is not None:
            seq = hidden.shape[0] * (parallel_state.get_tensor_model_parallel_world_size()
                                     if self.sequence_parallel else 1)
            rotary = self.rotary(seq)
        out, _ = self.layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary)
        return out


class FinalNormPipe(torch.nn.Module):
    """``GPTModel.decoder.final_layernorm`` (parameters under ``norm.``)."""

    def __init__(self, config, model_cfg: ModelConfig):
        super().__init__()
        self.norm = build_module(final_norm(model_cfg, config.sequence_parallel), config=config,
                                 hidden_size=config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


class OutputPipe(torch.nn.Module):
    """Untied head: ``GPTModel.output_layer``, a ColumnParallelLinear to vocab-parallel logits [s, b, v/tp]
    (under sequence parallelism it all-gathers the sequence first, as in GPTModel)."""

    def __init__(self, config, vocab_size: int):
        super().__init__()
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
            skip_bias_add=False, gather_output=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output_layer(hidden)
        return logits


class TiedHead:
    """Tied head: projects onto the tied module's word-embedding weight (a plain callable: no parameters)."""

    def __init__(self, config, vocab_size: int):
        self.projection = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
            skip_bias_add=False, gather_output=False, skip_weight_param_allocation=True)

    def __call__(self, embedding, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.projection(hidden, weight=embedding.word_embeddings_weight)
        return logits


def lm_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean vocab-parallel cross entropy; logits [s, b, v/tp], labels [b, s] (GPTModel's loss, then the mean
    that ``gpt_forward_loss`` takes)."""
    per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
    return per_token.mean()


class GPTPipelineModule(PipelineModule):
    """PipelineModule with the largelm layout facts needed to map names and check the partition."""

    num_transformer_layers: int
    tied: bool

    @property
    def tied_output_index(self) -> int:
        """Index of the last stage's copy of the tied word embedding (when ``tied``)."""
        return self.num_transformer_layers + 2

    def full_name_targets(self, name: str) -> list[tuple[int, str]]:
        """Where a full single-stage model's parameter ``name`` goes: [(layer index, key inside the layer)], two
        entries for a tied word embedding (used by ``largelm.model.weights.load_full_state_dict``)."""
        targets = [pipeline_layer_index(name, self.num_transformer_layers, self.tied)]
        if self.tied and name == "embedding.word_embeddings.weight":
            targets.append((self.tied_output_index, "word_embeddings.weight"))  # the last stage's tied copy
        return targets

    def holds(self, name: str) -> bool:
        """Whether this stage holds (a copy of) the full model's parameter ``name``."""
        return any(self.stage_layer(index) is not None for index, _ in self.full_name_targets(name))

    def stage_layer(self, index: int) -> Optional[torch.nn.Module]:
        """This rank's module for pipeline layer ``index`` (None if another stage holds it). For the tied
        layers this is the tied module (first stage: ``EmbeddingPipe``, last stage: ``OutputEmbeddingPipe``)."""
        if not self._local_start <= index < self._local_stop:
            return None
        if self.tied and index in (0, self.tied_output_index):
            return self.tied_modules[TIED_KEY]
        return getattr(self, str(index))


def build_gpt_pipeline(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, vocab_size: Optional[int] = None,
                       dtype: torch.dtype = torch.float32, activation_checkpointing: str = "none",
                       module_cls: type = GPTPipelineModule) -> GPTPipelineModule:
    """This rank's pipeline stage of the GPT. Needs ``init_model_parallel`` (megatron parallel_state, TP x PP).
    ``module_cls``: a ``GPTPipelineModule`` subclass to build (distillation's student,
    largelm/model/pipeline_distill.py)."""
    if model_cfg.arch != "gpt":
        raise ConfigError(f"build_gpt_pipeline builds model.arch='gpt', got {model_cfg.arch!r}")
    enable_cpu_compat()
    model_cfg, config, padded, per_stage = stage_config(model_cfg, parallel_cfg, vocab_size, dtype,
                                                       activation_checkpointing)
    spec = gpt_layer_spec(model_cfg, parallel_cfg.sequence_parallel, attention_choice(model_cfg, config))
    L, tied = model_cfg.num_layers, model_cfg.tie_embeddings
    layers: list = []
    layers.append(embedding_layer(EmbeddingPipe, tied, config, model_cfg, padded))
    layers += [LayerSpec(TransformerLayerPipe, config, model_cfg, spec, i % per_stage + 1) for i in range(L)]
    layers.append(LayerSpec(FinalNormPipe, config, model_cfg))
    if tied:
        layers.append(TiedLayerSpec(TIED_KEY, OutputEmbeddingPipe, config, padded,
                                    forward_fn=TiedHead(config, padded), tied_weight_attr=[TIED_ATTR]))
    else:
        layers.append(LayerSpec(OutputPipe, config, padded))

    topology = pipeline_topology(parallel_cfg)
    # no_grad: the constructor broadcasts the tied weight in place, which autograd would otherwise record on the
    # parameter (torch warns at the first backward that it cannot differentiate c10d::broadcast_).
    with torch.no_grad():
        module = module_cls(layers=layers, loss_fn=lm_loss_from_logits, topology=topology,
                            partition_method="type:TransformerLayerPipe", activation_checkpoint_interval=0)
    module.num_transformer_layers, module.tied = L, tied
    return finish_stage(module, config, dtype)


def finish_stage(module: PipelineModule, config: TransformerConfig, dtype: torch.dtype) -> PipelineModule:
    """What every pipeline builder ends with: check this rank's place in DeepSpeed's grid and that megatron's layer
    numbering (offset by stage) matches DeepSpeed's partition, cast to the device and dtype (megatron's torch norms
    and plain linears are created in fp32 whatever params_dtype says), and hook the sequence-parallel gradients."""
    check_grid_matches_parallel_state(module)
    for index in range(1, module.num_transformer_layers + 1):
        layer = module.stage_layer(index)
        if layer is not None and layer.layer.layer_number != index:
            raise RuntimeError(f"pipeline layer {index} got megatron layer_number {layer.layer.layer_number}: "
                               f"DeepSpeed's partition {module.parts} differs from megatron's")
    module.to(device=groups.device(), dtype=dtype)
    if config.sequence_parallel:
        reduce_sequence_parallel_grads_in_backward(module)
    return module


class StageConfig(NamedTuple):
    model_cfg: ModelConfig  # vocab_size set
    config: TransformerConfig
    padded_vocab: int  # the vocabulary padded for TP
    per_stage: int  # transformer layers per pipeline stage


def stage_config(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, vocab_size: Optional[int], dtype: torch.dtype,
                 activation_checkpointing: str) -> StageConfig:
    """What every pipeline builder starts from, after checking the layout against megatron's parallel_state."""
    model_cfg = resolve_vocab_size(model_cfg, vocab_size)
    tp, pp = check_layout(parallel_cfg)
    config = build_transformer_config(model_cfg, parallel_cfg, params_dtype=dtype,
                                      **recompute_fields(activation_checkpointing))
    # config validation: num_layers % pipeline_parallel == 0
    return StageConfig(model_cfg, config, model_cfg.padded_vocab_size(tp), model_cfg.num_layers // pp)


def pipeline_topology(parallel_cfg: ParallelConfig) -> PipeModelDataParallelTopology:
    """DeepSpeed's grid with axes (pipe, data, model), model fastest: the same rank order as megatron's tp-dp-pp
    groups (``check_grid_matches_parallel_state`` verifies it on every rank)."""
    tp, pp = parallel_cfg.tensor_parallel, parallel_cfg.pipeline_parallel
    return PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=torch.distributed.get_world_size() // (tp * pp))


def check_layout(parallel_cfg: ParallelConfig) -> tuple[int, int]:
    """(TP, PP) of ``parallel_cfg``, after checking megatron's parallel_state was initialised with them."""
    tp, pp = parallel_cfg.tensor_parallel, parallel_cfg.pipeline_parallel
    if (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size()) != (tp, pp):
        raise ConfigError(f"parallel.tensor_parallel={tp}, parallel.pipeline_parallel={pp} but megatron parallel_state "
                          "was initialised with another layout")
    return tp, pp


def embedding_layer(cls: type, tied: bool, *args) -> LayerSpec:
    """Layer 0: the embedding module, a ``TiedLayerSpec`` when the output layer shares its word embedding."""
    return TiedLayerSpec(TIED_KEY, cls, *args, tied_weight_attr=[TIED_ATTR]) if tied else LayerSpec(cls, *args)


def check_grid_matches_parallel_state(module: PipelineModule) -> None:
    """DeepSpeed's pipeline grid and megatron's parallel_state must put this rank at the same (pp, dp, tp)
    coordinates: megatron's groups run the TP collectives, DeepSpeed's the pipeline p2p and DP all-reduce, and
    the trainer picks its data shard by megatron's data-parallel rank."""
    grid = module.mpu()
    ours = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_data_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank())
    theirs = (grid.get_stage_id(), grid.get_data_parallel_rank(), grid.get_slice_parallel_rank())
    if ours != theirs:
        raise RuntimeError(f"rank {torch.distributed.get_rank()}: megatron (pp, dp, tp) = {ours} but DeepSpeed's "
                           f"pipeline grid says {theirs}")
    dp_ranks = torch.distributed.get_process_group_ranks(parallel_state.get_data_parallel_group())
    if sorted(dp_ranks) != sorted(grid.get_data_parallel_group_ranks()):
        raise RuntimeError(f"data-parallel groups differ: megatron {dp_ranks}, DeepSpeed {grid.dp_group}")


def pipeline_layer_index(name: str, num_layers: int, tied: bool) -> tuple[int, str]:
    """Map a ``GPTModel`` state-dict key to (pipeline layer index, key inside that layer's module).

    For tied models ``embedding.word_embeddings.weight`` lives in layer 0 *and* (as
    ``word_embeddings.weight``) in the last layer; this returns the first.
    """
    if name.startswith("embedding."):
        return 0, name
    if name.startswith("decoder.layers."):
        rest = name[len("decoder.layers."):]
        idx, sub = rest.split(".", 1)
        if not 0 <= int(idx) < num_layers:
            raise KeyError(f"{name}: layer {idx} is out of range for {num_layers} layers")
        return int(idx) + 1, "layer." + sub
    if name.startswith("decoder.final_layernorm."):
        return num_layers + 1, "norm." + name[len("decoder.final_layernorm."):]
    if name.startswith("output_layer."):
        if tied:
            raise KeyError(f"{name}: tied models have no separate output layer")
        return num_layers + 2, name
    raise KeyError(f"{name}: not a GPTModel parameter this pipeline knows")

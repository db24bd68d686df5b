"""GPT as a DeepSpeed PipelineModule built from megatron-core blocks (the GPT-NeoX / Megatron-DeepSpeed design).

The layer list is: embedding, ``num_layers`` transformer layers, final norm, output head. DeepSpeed partitions it
over pipeline stages (transformer layers balanced, embedding on the first stage, head on the last), runs the 1F1B
schedule, and - for tied embeddings - keeps the first stage's word embedding and the last stage's output weight
one parameter (``TiedLayerSpec``: broadcast at start, gradients all-reduced before every step).

Inside each layer the tensor-parallel building blocks are megatron-core's (same layer spec as ``GPTModel``), so
TP and sequence parallelism work unchanged. Activations cross stages as [s(/tp), b, h] tensors.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import build_module

from largelm.config import ModelConfig, ParallelConfig
from largelm.parallel import groups
from largelm.model.sequence_parallel import reduce_sequence_parallel_grads_in_backward
from largelm.model.specs import build_transformer_config, final_norm, gpt_layer_spec

TIED_KEY = "word_embeddings"


def _position_type(model_cfg: ModelConfig) -> str:
    return "rope" if model_cfg.style == "llama" else "learned_absolute"


class EmbeddingPipe(torch.nn.Module):
    """Stage input: token ids [b, s] -> hidden [s, b, h] (scattered over TP ranks under sequence parallelism)."""

    def __init__(self, config, model_cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.embedding = LanguageModelEmbedding(config, vocab_size=vocab_size,
                                                max_sequence_length=model_cfg.positions,
                                                position_embedding_type=_position_type(model_cfg))

    @property
    def word_embeddings_weight(self) -> torch.Tensor:
        return self.embedding.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        return self.embedding(input_ids=input_ids, position_ids=positions)


class TransformerLayerPipe(torch.nn.Module):
    """One megatron-core TransformerLayer; rotary embeddings (no parameters) are recomputed per layer."""

    def __init__(self, config, model_cfg: ModelConfig, layer_spec, layer_number: int):
        super().__init__()
        self.layer = build_module(layer_spec, config=config, layer_number=layer_number)
        self.rotary = (RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                       rotary_base=model_cfg.rotary_base, use_cpu_initialization=True)
                       if model_cfg.style == "llama" else None)
        self.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rotary = None
        if self.rotary is not None:
            seq = hidden.shape[0] * (parallel_state.get_tensor_model_parallel_world_size()
                                     if self.sequence_parallel else 1)
            rotary = self.rotary(seq)
        out, _ = self.layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary)
        return out


class FinalNormPipe(torch.nn.Module):
    def __init__(self, config, model_cfg: ModelConfig):
        super().__init__()
        self.norm = build_module(final_norm(model_cfg, config.sequence_parallel), config=config,
                                 hidden_size=config.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


class OutputPipe(torch.nn.Module):
    """Untied head: ColumnParallelLinear to vocab-parallel logits [s, b, v/tp]."""

    def __init__(self, config, vocab_size: int):
        super().__init__()
        self.output_layer = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
            skip_bias_add=False, gather_output=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output_layer(hidden)
        return logits


class TiedHead:
    """Tied head: the last stage's copy of the embedding module projects onto its word-embedding weight."""

    def __init__(self, config, vocab_size: int):
        self.projection = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
            skip_bias_add=False, gather_output=False, skip_weight_param_allocation=True)

    def __call__(self, embedding_stage: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.projection(hidden, weight=embedding_stage.word_embeddings_weight)
        return logits


def lm_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean vocab-parallel cross entropy; logits [s, b, v/tp], labels [b, s] (same as GPTModel's loss)."""
    per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.transpose(0, 1).contiguous())
    return per_token.mean()


def build_gpt_pipeline(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *, vocab_size: int,
                       dtype: torch.dtype = torch.float32) -> PipelineModule:
    """The pipeline-parallel GPT. Process groups must be initialised (megatron parallel_state with TP x PP)."""
    config = build_transformer_config(model_cfg, parallel_cfg, params_dtype=dtype)
    spec = gpt_layer_spec(model_cfg, parallel_cfg.sequence_parallel)
    padded = model_cfg.padded_vocab_size(parallel_cfg.tensor_parallel)
    layers: list = []
    if model_cfg.tie_embeddings:
        layers.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, config, model_cfg, padded,
                                    tied_weight_attr=["word_embeddings_weight"]))
    else:
        layers.append(LayerSpec(EmbeddingPipe, config, model_cfg, padded))
    layers += [LayerSpec(TransformerLayerPipe, config, model_cfg, spec, i + 1) for i in range(model_cfg.num_layers)]
    layers.append(LayerSpec(FinalNormPipe, config, model_cfg))
    if model_cfg.tie_embeddings:
        layers.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, config, model_cfg, padded,
                                    forward_fn=TiedHead(config, padded), tied_weight_attr=["word_embeddings_weight"]))
    else:
        layers.append(LayerSpec(OutputPipe, config, padded))

    world = torch.distributed.get_world_size()
    tp, pp = parallel_cfg.tensor_parallel, parallel_cfg.pipeline_parallel
    # Axes (pipe, data, model) with model fastest: the same rank order as megatron's tp-dp-pp groups.
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=world // (tp * pp))
    module = PipelineModule(layers=layers, loss_fn=lm_loss_from_logits, topology=topology,
                            partition_method="type:TransformerLayerPipe", activation_checkpoint_interval=0)
    module.to(device=groups.device(), dtype=dtype)
    if config.sequence_parallel:
        reduce_sequence_parallel_grads_in_backward(module)
    return module


def pipeline_layer_index(name: str, num_layers: int, tied: bool) -> tuple[int, str]:
    """Map a ``GPTModel`` state-dict key to (pipeline layer index, key inside that layer)."""
    if name.startswith("embedding."):
        return 0, name
    if name.startswith("decoder.layers."):
        rest = name[len("decoder.layers."):]
        idx, sub = rest.split(".", 1)
        return int(idx) + 1, "layer." + sub
    if name.startswith("decoder.final_layernorm."):
        return num_layers + 1, "norm." + name[len("decoder.final_layernorm."):]
    if name.startswith("output_layer."):
        if tied:
            raise KeyError(f"{name}: tied models have no separate output layer")
        return num_layers + 2, name
    raise KeyError(f"{name}: not a GPTModel parameter this pipeline knows")

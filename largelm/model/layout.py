"""Parameter names, full shapes and tensor/pipeline layout rules of largelm's megatron ``GPTModel``.

Everything here is derived from names and the model config alone (no model is built), so a checkpoint of any
size can be unsharded on a small machine. tests/test_convert.py checks these rules against the attributes
megatron-core puts on a real model (``partition_dim``/``partition_stride``, via ``largelm.parallel.sharding.tp_layout``)
and against ``largelm.model.pipeline.pipeline_layer_index``.

Tensor parallelism (megatron-core, TP rank r of t):

* column-parallel, split along dim 0: ``embedding.word_embeddings.weight`` and ``output_layer.weight`` (vocab,
  padded to ``model.padded_vocab_size(t)``), ``linear_qkv`` weight and bias (whole query groups per rank, each
  group ``[q_1 .. q_r, k, v]``), ``linear_fc1`` weight and bias (SwiGLU: ``[gate; up]`` with partition stride 2,
  i.e. rank r holds ``[gate_r; up_r]``);
* row-parallel, split along dim 1: ``linear_proj.weight``, ``linear_fc2.weight``;
* replicated on every TP rank: norms, position embeddings, the biases of row-parallel layers.

Pipeline parallelism (DeepSpeed ``PipelineModule``, largelm.model.pipeline): layer ``0`` = embedding,
``1..L`` = transformer layers, ``L+1`` = final norm, ``L+2`` = output head; parameter names are
``<layer index>.<key>``, and for tied embeddings ``tied_modules.word_embeddings.<key>`` (the first stage's
``EmbeddingPipe`` and the last stage's ``OutputEmbeddingPipe`` copy, which hold the same weight).
"""

from __future__ import annotations

from typing import Optional

from largelm.config import BertConfig, ModelConfig
from largelm.errors import ConversionError
from largelm.model.pipeline_names import (  # noqa: F401 - TIED_PREFIX: part of this module's API
    BERT_HEADS,
    GPT_HEADS,
    TIED_PREFIX,
    WORD_EMBEDDINGS,
    pipeline_name_to_dense,
)

POSITION_EMBEDDINGS = "embedding.position_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"
OUTPUT_BIAS = "output_layer.bias"  # BERT's MLM output bias (vocab-parallel)
VOCAB_PARALLEL = (WORD_EMBEDDINGS, OUTPUT_LAYER, OUTPUT_BIAS)
# BERT distillation's learned hidden-state projection (largelm/train/distill_bert.py): a training-only submodule of
# the student, in its training checkpoints but not part of the model: the checkpoint reader drops it
# (largelm/checkpoint/reader.py read_mp_rank_states)
DISTILL_PROJECTION = "distill_projection"

_COLUMN = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")
# any MLP's: the dense layer's ``mlp.linear_fc1``, an MoE layer's ``mlp.experts.local_experts.<e>.linear_fc1`` and
# ``mlp.shared_experts.linear_fc1`` (megatron splits experts over the expert tensor-parallel group, = TP, alike)
_FC1 = ("linear_fc1.weight", "linear_fc1.bias")
_ROW = ("self_attention.linear_proj.weight", "linear_fc2.weight")


def is_gated(model: ModelConfig) -> bool:
    """SwiGLU MLP (fused ``linear_fc1`` = [gate; up])."""
    return model.style == "llama"


def has_biases(model: ModelConfig) -> bool:
    return model.style == "gpt2"


def tp_partition(name: str, gated: bool) -> Optional[tuple[int, int]]:
    """(partition dim, partition stride) of a tensor-parallel ``GPTModel`` parameter; None if replicated."""
    if name in VOCAB_PARALLEL:
        return 0, 1
    if name.endswith(_COLUMN):
        return 0, 1
    if name.endswith(_FC1):
        return 0, 2 if gated else 1
    if name.endswith(_ROW):
        return 1, 1
    return None


def gpt_param_shapes(model: ModelConfig, vocab_rows: Optional[int] = None) -> dict[str, tuple[int, ...]]:
    """Every ``GPTModel`` parameter at TP=1, in megatron's order, with its full shape.

    ``vocab_rows`` is the row count of the vocabulary-parallel tensors (default: ``model.vocab_size``, i.e.
    unpadded; pass ``model.padded_vocab_size(tp)`` for the padded layout).
    """
    if model.vocab_size is None:
        raise ConversionError("model.vocab_size is not set")
    h, nq, ng = model.hidden_size, model.num_attention_heads, model.kv_groups
    d = h // nq
    ffn = model.ffn_size
    rows = vocab_rows or model.vocab_size
    bias = has_biases(model)
    shapes: dict[str, tuple[int, ...]] = {WORD_EMBEDDINGS: (rows, h)}
    if model.style == "gpt2":
        shapes[POSITION_EMBEDDINGS] = (model.positions, h)

    def norm(prefix: str) -> None:
        shapes[prefix + ".weight"] = (h,)
        if bias:
            shapes[prefix + ".bias"] = (h,)

    def linear(prefix: str, out: int, inp: int, with_bias: bool) -> None:
        shapes[prefix + ".weight"] = (out, inp)
        if with_bias:
            shapes[prefix + ".bias"] = (out,)

    for i in range(model.num_layers):
        p = f"decoder.layers.{i}."
        norm(p + "input_layernorm")
        linear(p + "self_attention.linear_proj", h, nq * d, bias)
        linear(p + "self_attention.linear_qkv", (nq + 2 * ng) * d, h, bias)
        norm(p + "pre_mlp_layernorm")
        linear(p + "mlp.linear_fc1", ffn * (2 if is_gated(model) else 1), h, bias)
        linear(p + "mlp.linear_fc2", h, ffn, bias)
    norm("decoder.final_layernorm")
    if not model.tie_embeddings:
        shapes[OUTPUT_LAYER] = (rows, h)
    return shapes


def moe_param_shapes(model: ModelConfig, vocab_rows: Optional[int] = None) -> dict[str, tuple[int, ...]]:
    """Every MoE ``GPTModel`` parameter (``model.arch: moe``; llama style, no biases) at TP=1 and EP=1 - experts
    numbered globally, ``local_experts.{e}`` for e in 0..num_experts-1 - in megatron's order, with full shapes. The
    dense layers (``model.moe.is_moe_layer`` False) are the GPT's."""
    dense = gpt_param_shapes(model, vocab_rows)
    moe = model.moe
    h = model.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in dense.items():
        if ".mlp." not in name:
            shapes[name] = shape
            continue
        layer = int(name.split(".")[2])
        if not moe.is_moe_layer(layer):
            shapes[name] = shape
        elif name.endswith("mlp.linear_fc1.weight"):  # the layer's MLP slot, once: router, experts, shared expert
            p = f"decoder.layers.{layer}.mlp."
            shapes[p + "router.weight"] = (moe.num_experts, h)
            for e in range(moe.num_experts):
                shapes[p + f"experts.local_experts.{e}.linear_fc1.weight"] = (2 * moe.ffn_size, h)
                shapes[p + f"experts.local_experts.{e}.linear_fc2.weight"] = (h, moe.ffn_size)
            if moe.shared_expert_ffn_size is not None:
                shapes[p + "shared_experts.linear_fc1.weight"] = (2 * moe.shared_expert_ffn_size, h)
                shapes[p + "shared_experts.linear_fc2.weight"] = (h, moe.shared_expert_ffn_size)
    return shapes


def bert_param_shapes(model: ModelConfig, bert: Optional[BertConfig] = None,
                      vocab_rows: Optional[int] = None) -> dict[str, tuple[int, ...]]:
    """Every megatron ``BertModel`` parameter at TP=1 with its full shape, in the module's order (``vocab_rows`` as
    in ``gpt_param_shapes``). ``bert.residual_post_layernorm`` moves the layer norms to ``input_norm``/``mlp_norm``
    (registered after the MLP; largelm/model/bert_layers.py); ``bert.binary_head`` adds the binary head and pooler."""
    bert = bert or BertConfig()
    h, rows = model.hidden_size, vocab_rows or model.vocab_size
    gpt = gpt_param_shapes(model.model_copy(update={"tie_embeddings": True}), vocab_rows=rows)
    shapes: dict[str, tuple[int, ...]] = {WORD_EMBEDDINGS: (rows, h), POSITION_EMBEDDINGS: (model.positions, h),
                                          "embedding.tokentype_embeddings.weight": (2, h)}
    for i in range(model.num_layers):
        prefix = f"decoder.layers.{i}."
        layer = {name[len(prefix):]: shape for name, shape in gpt.items() if name.startswith(prefix)}
        norms = {k: v for k, v in layer.items() if "layernorm" in k}
        if bert.residual_post_layernorm:
            layer = {k: v for k, v in layer.items() if k not in norms}
            layer.update({k.replace("input_layernorm", "input_norm").replace("pre_mlp_layernorm", "mlp_norm"): v
                          for k, v in norms.items()})
        shapes.update({f"encoder.layers.{i}.{k}": v for k, v in layer.items()})
    shapes.update({"encoder.final_layernorm.weight": (h,), "encoder.final_layernorm.bias": (h,),
                   "lm_head.dense.weight": (h, h), "lm_head.dense.bias": (h,),
                   "lm_head.layer_norm.weight": (h,), "lm_head.layer_norm.bias": (h,)})
    if not model.tie_embeddings:
        shapes[OUTPUT_LAYER] = (rows, h)
    shapes[OUTPUT_BIAS] = (rows,)
    if bert.binary_head:
        shapes.update({"binary_head.weight": (2, h), "binary_head.bias": (2,),
                       "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)})
    return shapes


def param_shapes(model: ModelConfig, bert: Optional[BertConfig] = None,
                 vocab_rows: Optional[int] = None) -> dict[str, tuple[int, ...]]:
    """``gpt_param_shapes``, ``moe_param_shapes`` or ``bert_param_shapes`` by ``model.arch``."""
    if model.arch == "bert":
        return bert_param_shapes(model, bert, vocab_rows)
    if model.arch == "moe":
        return moe_param_shapes(model, vocab_rows)
    return gpt_param_shapes(model, vocab_rows)


def check_tensor_parallel(model: ModelConfig, tp: int) -> None:
    """Raise ConversionError when ``model`` cannot be split over ``tp`` tensor-parallel ranks."""
    problems = []
    if model.num_attention_heads % tp:
        problems.append(f"num_attention_heads={model.num_attention_heads} is not divisible by tensor_parallel={tp}")
    if model.kv_groups % tp:
        problems.append(f"query groups (num_query_groups)={model.kv_groups} is not divisible by tensor_parallel={tp}")
    if model.ffn_size % tp:
        problems.append(f"ffn size={model.ffn_size} is not divisible by tensor_parallel={tp}")
    if problems:
        raise ConversionError(f"cannot shard this model over tensor_parallel={tp}: " + "; ".join(problems))


def check_pipeline_parallel(model: ModelConfig, pp: int) -> None:
    if model.num_layers % pp:
        raise ConversionError(
            f"cannot split this model over pipeline_parallel={pp}: num_layers={model.num_layers} is not divisible by it"
        )


# --- pipeline (DeepSpeed PipelineModule) names ---------------------------------------------------------------
def pipeline_name_to_gpt(name: str, num_layers: int) -> str:
    """A ``GPTPipelineModule`` parameter name -> the ``GPTModel`` name of the same tensor (layer L+2 holds the
    output layer); the last stage's tied copy of the word embedding maps to ``embedding.word_embeddings.weight``."""
    try:
        return pipeline_name_to_dense(name, num_layers, "decoder", GPT_HEADS)
    except KeyError as err:
        raise ConversionError(str(err.args[0])) from None


def gpt_model_name(name: str, model: ModelConfig) -> str:
    """A ``GPTModel`` or ``GPTPipelineModule`` parameter name -> the ``GPTModel`` name of that tensor."""
    return name if _is_gpt_name(name) else pipeline_name_to_gpt(name, model.num_layers)


def bert_model_name(name: str, model: ModelConfig) -> str:
    """A ``BertModel`` or ``BertPipelineModule`` parameter name -> the ``BertModel`` name of that tensor."""
    if _is_bert_name(name):
        return name
    try:
        return pipeline_name_to_dense(name, model.num_layers, "encoder", BERT_HEADS)
    except KeyError as err:
        raise ConversionError(str(err.args[0])) from None


def model_name(name: str, model: ModelConfig) -> str:
    """A module-native parameter name (dense model or pipeline stage) -> the dense model's name of that tensor.
    (The checkpoint reader's name-only dispatch; model code looks the architecture's ``dense_name`` up in
    largelm/model/registry.py.)"""
    return bert_model_name(name, model) if model.arch == "bert" else gpt_model_name(name, model)


def to_model_names(state: dict, model: ModelConfig) -> dict:
    """Rename a module-native state dict (``GPTModel``/``BertModel`` or pipeline names) to the dense model's names.

    Pipeline names that map to the same tensor (the tied embedding's two copies) must be equal; the first wins.
    """
    out: dict = {}
    for name, tensor in state.items():
        if name.endswith("_extra_state"):
            continue
        dense = model_name(name, model)
        if dense in out:
            if out[dense].shape != tensor.shape or not bool((out[dense] == tensor).all()):
                diff = ((out[dense].float() - tensor.float()).abs().max().item()
                        if out[dense].shape == tensor.shape else None)
                raise ConversionError(f"{name} and another copy of {dense} in the same stage differ (max diff {diff})")
            continue
        out[dense] = tensor
    return out


def _is_bert_name(name: str) -> bool:
    return name.startswith(("embedding.", "encoder.", "lm_head.", "output_layer.", "binary_head.", "pooler."))


def is_model_name(name: str, model: ModelConfig) -> bool:
    """Whether ``name`` is a dense-model name (else a pipeline name)."""
    return _is_bert_name(name) if model.arch == "bert" else _is_gpt_name(name)


def _is_gpt_name(name: str) -> bool:
    return name.startswith(("embedding.", "decoder.")) or name == OUTPUT_LAYER


def mp_rank_coordinates(mp_rank: int, tp: int) -> tuple[int, int]:
    """DeepSpeed's model-parallel rank (file names ``mp_rank_XX``) -> (pipeline stage, tensor-parallel rank).

    DeepSpeed numbers the model-parallel group (TP x PP ranks of one data-parallel replica) in global-rank
    order; with megatron's ``tp-cp-ep-dp-pp`` order (TP fastest, PP slowest) that is ``stage * tp + tp_rank``.
    """
    return mp_rank // tp, mp_rank % tp

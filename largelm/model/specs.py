"""Model *shape* (ModelConfig) -> megatron-core TransformerConfig + layer spec.

Two halves, kept apart the way megatron-core keeps them apart:

* ``build_transformer_config`` says what the network computes (sizes, norm, activation, biases,
  dropout) and which kernels may be used on this device.
* ``gpt_layer_spec``/``gpt_block_spec`` say which parallel building blocks compute it. We use megatron-core's own
  *local* spec (``get_gpt_layer_local_spec``: ColumnParallelLinear/RowParallelLinear,
  DotProductAttention, torch norms) because Transformer Engine is not installed and the same spec
  must run on CPU. For sequence parallelism the norms are swapped for ``SequenceParallelNorm``
  (largelm/parallel/sequence_parallel.py), the one piece megatron-core's local spec lacks.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from largelm.config import ModelConfig, ParallelConfig
from largelm.model.attention import KINDS, core_attention_kind
from largelm.parallel.sequence_parallel import SequenceParallelNorm

STYLES = ("gpt2", "llama")


def normalization(model_cfg: ModelConfig) -> str:
    return "RMSNorm" if model_cfg.style == "llama" else "LayerNorm"


def position_embedding_type(model_cfg: ModelConfig) -> str:
    """megatron GPTModel's ``position_embedding_type`` for this style."""
    return "rope" if model_cfg.style == "llama" else "learned_absolute"


def _fused_softmax_kernels_available() -> bool:
    # megatron's masked-softmax fusion imports these compiled modules lazily, at the first forward.
    return importlib.util.find_spec("scaled_upper_triang_masked_softmax_cuda") is not None


def kernel_fusions(model_cfg: ModelConfig, on_cuda: bool) -> dict[str, bool]:
    """Which megatron fusions to switch on. All are off on CPU (they are CUDA kernels or need apex/TE).

    On GPU we enable only fusions that (a) exist without Transformer Engine/apex and (b) compute the
    same function as the unfused path, so a GPU run trains the same model the CPU tests check:

    * ``bias_dropout_fusion``: torch-jit fused bias+dropout+add; same math.
    * ``bias_activation_fusion``: only for SwiGLU (llama). megatron's fused bias-GeLU is the *tanh*
      approximation while the unfused path is exact erf GeLU (``F.gelu``), so gpt2 style keeps it off.
    * ``masked_softmax_fusion``: only when megatron's compiled softmax kernels are importable.
    * ``gradient_accumulation_fusion``: never. It writes weight grads into megatron-DDP ``main_grad``
      buffers; DeepSpeed owns gradients here.
    * ``persist_layer_norm`` (apex) and ``apply_rope_fusion`` (Transformer Engine): never; neither is
      installed, and megatron's torch norm asserts ``persist_layer_norm`` is off.
    """
    return {
        "bias_dropout_fusion": on_cuda,
        "bias_activation_fusion": on_cuda and model_cfg.style == "llama",
        "masked_softmax_fusion": on_cuda and _fused_softmax_kernels_available(),
        "gradient_accumulation_fusion": False,
        "persist_layer_norm": False,
        "apply_rope_fusion": False,
    }


def build_transformer_config(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    params_dtype: torch.dtype = torch.float32,
    *,
    on_cuda: Optional[bool] = None,
    **overrides: Any,
) -> TransformerConfig:
    """TransformerConfig for ``model_cfg`` laid out by ``parallel_cfg``.

    ``on_cuda`` defaults to ``torch.cuda.is_available()``; it decides where weights are initialised
    (``use_cpu_initialization`` off a GPU) and which fusions are allowed (``kernel_fusions``).
    ``overrides`` are passed to TransformerConfig as-is (e.g. ``recompute_granularity="full"``,
    ``recompute_method="uniform"``, ``recompute_num_layers=1``) and win over derived values.
    """
    if model_cfg.style not in STYLES:
        raise ValueError(f"model.style={model_cfg.style!r} is not one of {STYLES}")
    if on_cuda is None:
        on_cuda = torch.cuda.is_available()
    llama = model_cfg.style == "llama"
    fields: dict[str, Any] = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.kv_groups,
        ffn_hidden_size=model_cfg.ffn_size,
        kv_channels=model_cfg.hidden_size // model_cfg.num_attention_heads,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        init_method_std=model_cfg.init_method_std,
        layernorm_epsilon=model_cfg.norm_epsilon,
        normalization=normalization(model_cfg),
        # gpt2: GeLU MLP with biases everywhere. llama: SwiGLU = silu(gate) * up, no biases.
        activation_func=F.silu if llama else F.gelu,
        gated_linear_unit=llama,
        add_bias_linear=not llama,
        add_qkv_bias=not llama,
        # parallel layout
        tensor_model_parallel_size=parallel_cfg.tensor_parallel,
        pipeline_model_parallel_size=parallel_cfg.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel_cfg.virtual_pipeline,
        sequence_parallel=parallel_cfg.sequence_parallel,
        # precision
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # device
        use_cpu_initialization=not on_cuda,
        **kernel_fusions(model_cfg, on_cuda),
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def recompute_fields(activation_checkpointing: str) -> dict[str, Any]:
    """TransformerConfig fields for ``train.activation_checkpointing``. ``selective``: megatron recomputes core
    attention in backward (inside each layer). ``full``: every layer's forward is recomputed in backward, one layer
    per checkpoint - megatron's ``TransformerBlock`` does it for the dense models, the pipeline stages' layer
    wrappers (``TransformerLayerPipe``, ``BertLayerPipe``) for pipeline parallelism, both with megatron's
    ``tensor_parallel.checkpoint`` (which restores the RNG streams, so dropout masks repeat exactly)."""
    if activation_checkpointing == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if activation_checkpointing == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if activation_checkpointing != "none":
        raise ValueError(f"train.activation_checkpointing={activation_checkpointing!r} is not none/selective/full")
    return {}


def checkpointed_layer_call(config: TransformerConfig, function, *args):
    """``function(*args)``, recomputed in backward when ``config`` asks for full recompute (pipeline layers)."""
    if config.recompute_granularity != "full":
        return function(*args)
    from megatron.core import tensor_parallel

    return tensor_parallel.checkpoint(function, False, *args)


def gpt_layer_spec(model_cfg: ModelConfig, sequence_parallel: bool = False, attention: str = "local") -> ModuleSpec:
    """One transformer layer: megatron-core's local layer spec with the norm chosen by ``normalization``.

    megatron's torch norms refuse sequence parallelism (they cannot mark their weights for the
    tensor-parallel grad all-reduce), so with ``sequence_parallel`` the two norm slots get
    ``SequenceParallelNorm``. ``attention`` names the core attention (``attention_choice``;
    largelm/model/attention.py): ``local`` is megatron's ``DotProductAttention``, ``sdpa``/``bmm`` its
    subclasses with a faster causal path. Everything else stays megatron's.
    """
    layer = get_gpt_layer_local_spec(normalization=normalization(model_cfg))
    if sequence_parallel:
        layer.submodules.input_layernorm = SequenceParallelNorm
        layer.submodules.pre_mlp_layernorm = SequenceParallelNorm
    layer.submodules.self_attention.submodules.core_attention = KINDS[attention]
    return layer


def attention_choice(model_cfg: ModelConfig, config: TransformerConfig) -> str:
    """This model's core attention kind (``model.attention`` on this device; largelm/model/attention.py)."""
    return core_attention_kind(model_cfg, on_cuda=not config.use_cpu_initialization)


def final_norm(model_cfg: ModelConfig, sequence_parallel: bool = False) -> type:
    """The norm module after the last layer: the layers' own norm class. (megatron's block default,
    ``LayerNormImpl``, is apex's FusedLayerNorm whenever apex is installed, which cannot do RMSNorm.)"""
    return gpt_layer_spec(model_cfg, sequence_parallel).submodules.input_layernorm


def gpt_block_spec(
    model_cfg: ModelConfig, config: TransformerConfig, vp_stage: Optional[int] = None
) -> TransformerBlockSubmodules:
    """What GPTModel takes as ``transformer_layer_spec``: this pipeline stage's layers plus
    ``final_norm``, spelled out at block level because the final norm is only choosable there."""
    layer = gpt_layer_spec(model_cfg, config.sequence_parallel, attention_choice(model_cfg, config))
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * num_layers, layer_norm=final_norm(model_cfg, config.sequence_parallel)
    )

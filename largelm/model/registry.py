"""The architecture registry: one ``ArchSpec`` per ``model.arch`` (torchtitan's TrainSpec pattern).

Everything that differs between architectures - which module is built (dense and as pipeline stages), how a batch
becomes a loss and metrics, how the pipeline takes a micro-batch, FLOPs per token, parameter names and shapes, how
conversion checks run it, the Hugging Face adapters, what the loader feeds it - is looked up here by the callers
(step drivers in largelm/train/step.py, the trainer, conversion, quantization), which never branch on the
architecture themselves. Adding an architecture = its own files (model, pipeline stages, adapters) plus one
``ArchSpec`` passed to ``register_arch``; ``model.arch`` names it.

Builder signatures (``section`` is the architecture's own config section, ``config_section``, or None):

* ``build_model(model_cfg, parallel_cfg, section, *, dtype, **transformer_config_overrides)`` -> this rank's dense
  module (its TP shard; megatron parallel_state must be initialised);
* ``build_pipeline(model_cfg, parallel_cfg, section, *, dtype, activation_checkpointing[, module_cls])`` -> this rank's
  DeepSpeed ``PipelineModule`` stage. Its ``loss_fn`` may keep per-micro-batch metrics (``records``, named by the
  module's ``metric_names``, first ``"loss"``): the pipeline step driver then reports them like the dense path.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Optional

from largelm.config import ConfigError, ModelConfig
from largelm.model import bert, bert_pipeline, gpt, layout, moe, pipeline
from largelm.model.flops import bert_flops_per_token, gpt_flops_per_token, moe_flops_per_token
from largelm.model.hf import bert as hf_bert
from largelm.model.hf import gpt2 as hf_gpt2
from largelm.model.hf import llama as hf_llama
from largelm.model.hf import mixtral as hf_mixtral


@dataclass(frozen=True)
class ArchSpec:
    """What the rest of largelm needs to know about one architecture (see the module docstring)."""

    name: str  # the ``model.arch`` value
    # the Config (and Consolidated) attribute holding this architecture's own settings, e.g. "bert"; None: none
    config_section: Optional[str]
    # fields of that section that decide the parameter set: they travel with converted weights
    section_weight_fields: tuple[str, ...]
    # a next-token language model on ``tokens`` batches: validation perplexity, quantization, distillation
    causal_lm: bool
    build_model: Callable[..., Any]
    build_pipeline: Callable[..., Any]
    # (model or engine, batch, cfg) -> {"loss": scalar with grad, other fp32 scalar metrics}
    forward_metrics: Callable[[Any, dict, Any], dict]
    # batch -> (inputs for the first stage, labels for the last)
    pipeline_micro_batch: Callable[[dict], tuple]
    # (model_cfg, section) -> training FLOPs per token (largelm/model/flops.py)
    flops_per_token: Callable[[ModelConfig, Any], float]
    # (model_cfg, section, vocab_rows) -> full (TP=1) dense parameter shapes, in module order (layout.py)
    param_shapes: Callable[..., dict]
    # (module-native parameter name, model_cfg) -> the dense model's name (pipeline names mapped; layout.py)
    dense_name: Callable[[str, ModelConfig], str]
    # cfg -> extra ``build_loader`` arguments (the sample kind and a per-sample transform)
    loader_kwargs: Callable[[Any], dict]
    # how conversion verification runs it (largelm.convert.verify): ``CausalLMProbe`` / ``BertProbe``
    probe: Any
    # model_cfg -> the Hugging Face adapter module an export uses (largelm/model/hf/)
    hf_export: Callable[[ModelConfig], ModuleType]
    # Hugging Face ``model_type`` -> the adapter module that imports it
    hf_imports: dict[str, ModuleType]
    # the dense model's per-layer parameter prefix (``<prefix><index>.``): distillation's every_kth_layer init
    layer_prefix: str = "decoder.layers."
    # which distillation loss trains it (largelm.train.distill.DISTILL_LOSSES): "causal_lm" or "masked_lm"
    distill_objective: str = "causal_lm"

    def section(self, owner) -> Any:
        """This architecture's config section of ``owner`` (a Config or a Consolidated model), or None."""
        return getattr(owner, self.config_section) if self.config_section else None

    def section_args(self, owner) -> tuple:
        """``(section,)`` for the adapters and builders that take it, ``()`` for an architecture without one."""
        return (self.section(owner),) if self.config_section else ()


ARCHS: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Make ``spec`` available as ``model.arch: <spec.name>``."""
    if spec.name in ARCHS:
        raise ValueError(f"architecture {spec.name!r} is already registered")
    ARCHS[spec.name] = spec
    return spec


def get_arch(name: str) -> ArchSpec:
    """The spec of ``model.arch`` = ``name``; a ConfigError naming the registered ones otherwise."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ConfigError(f"model.arch={name!r} is not a registered architecture (known: "
                          f"{', '.join(sorted(ARCHS))}; largelm/model/registry.py)") from None


def arch_for_hf_model_type(model_type: Optional[str]) -> Optional[tuple[ArchSpec, ModuleType]]:
    """(spec, adapter module) that imports a Hugging Face ``model_type``; None when no architecture does."""
    for spec in ARCHS.values():
        if model_type in spec.hf_imports:
            return spec, spec.hf_imports[model_type]
    return None


# --- GPT (gpt2 and llama styles) ---------------------------------------------------------------------------------
def _gpt_model(model_cfg, parallel_cfg, _section=None, *, dtype, **overrides):
    return gpt.build_gpt_model(model_cfg, parallel_cfg, vocab_size=model_cfg.vocab_size, dtype=dtype, **overrides)


def _gpt_pipeline(model_cfg, parallel_cfg, _section=None, *, dtype, activation_checkpointing="none", **kwargs):
    return pipeline.build_gpt_pipeline(model_cfg, parallel_cfg, vocab_size=model_cfg.vocab_size, dtype=dtype,
                                       activation_checkpointing=activation_checkpointing, **kwargs)


GPT = register_arch(ArchSpec(
    name="gpt", config_section=None, section_weight_fields=(), causal_lm=True,
    build_model=_gpt_model, build_pipeline=_gpt_pipeline,
    forward_metrics=gpt.gpt_forward_metrics, pipeline_micro_batch=gpt.gpt_pipeline_micro_batch,
    flops_per_token=lambda model_cfg, _section=None: gpt_flops_per_token(model_cfg),
    param_shapes=lambda model_cfg, _section=None, vocab_rows=None: layout.gpt_param_shapes(model_cfg, vocab_rows),
    dense_name=layout.gpt_model_name, loader_kwargs=lambda cfg: {}, probe=gpt.CausalLMProbe(),
    hf_export=lambda model_cfg: hf_llama if model_cfg.style == "llama" else hf_gpt2,
    hf_imports={"gpt2": hf_gpt2, "llama": hf_llama},
))


# --- BERT (MLM + SOP/NSP) ----------------------------------------------------------------------------------------
def _bert_model(model_cfg, parallel_cfg, section=None, *, dtype, **overrides):
    return bert.build_bert_model(model_cfg, parallel_cfg, section, vocab_size=model_cfg.vocab_size, dtype=dtype,
                                 **overrides)


def _bert_pipeline(model_cfg, parallel_cfg, section=None, *, dtype, activation_checkpointing="none", **kwargs):
    return bert_pipeline.build_bert_pipeline(model_cfg, parallel_cfg, section, vocab_size=model_cfg.vocab_size,
                                             dtype=dtype, activation_checkpointing=activation_checkpointing, **kwargs)


BERT = register_arch(ArchSpec(
    name="bert", config_section="bert", section_weight_fields=("binary_head", "residual_post_layernorm"),
    causal_lm=False, build_model=_bert_model, build_pipeline=_bert_pipeline,
    forward_metrics=bert.bert_step_metrics, pipeline_micro_batch=bert.bert_pipeline_micro_batch,
    flops_per_token=lambda model_cfg, section: bert_flops_per_token(model_cfg, binary_head=section.binary_head),
    param_shapes=layout.bert_param_shapes, dense_name=layout.bert_model_name, loader_kwargs=bert.bert_loader_kwargs,
    probe=bert.BertProbe(), hf_export=lambda model_cfg: hf_bert,
    hf_imports={"bert": hf_bert, "megatron-bert": hf_bert},
    layer_prefix="encoder.layers.", distill_objective="masked_lm",
))


# --- MoE GPT (llama-style layers with mixture-of-experts MLPs; largelm/model/moe.py) --------------------------------
def _no_moe_pipeline(model_cfg, parallel_cfg, _section=None, **_kwargs):
    raise ConfigError("model.arch='moe' has no pipeline-parallel stages (parallel.pipeline_parallel must be 1)")


MOE = register_arch(ArchSpec(
    name="moe", config_section=None, section_weight_fields=(), causal_lm=True,
    build_model=moe.build_moe_model, build_pipeline=_no_moe_pipeline,
    forward_metrics=moe.moe_forward_metrics, pipeline_micro_batch=gpt.gpt_pipeline_micro_batch,
    flops_per_token=lambda model_cfg, _section=None: moe_flops_per_token(model_cfg),
    param_shapes=lambda model_cfg, _section=None, vocab_rows=None: layout.moe_param_shapes(model_cfg, vocab_rows),
    dense_name=layout.gpt_model_name, loader_kwargs=lambda cfg: {}, probe=gpt.CausalLMProbe(),
    hf_export=lambda model_cfg: hf_mixtral, hf_imports={"mixtral": hf_mixtral},
))

"""The mixture-of-experts GPT (``model.arch: moe``): megatron-core's GPTModel whose MLPs are ``MoELayer``s.

Built from megatron-core 0.16.1's local layer spec (``get_gpt_layer_local_spec(num_experts=..., moe_grouped_gemm=
False)``): a ``TopKRouter`` (softmax over ``model.moe.num_experts`` logits, top ``top_k``), ``SequentialMLP``
experts (SwiGLU, ``model.moe.ffn_size`` each), an optional always-on shared expert, and the *allgather* token
dispatcher (the alltoall one creates CUDA streams in its constructor; allgather is plain collectives and runs on
gloo). Every ``model.moe.layer_freq``-th layer (0, k, 2k, ...) is MoE, the others are the dense llama layer.

Parameter names are megatron's (``decoder.layers.{i}.mlp.router.weight``,
``decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight`` with ``e`` the *local* expert index: on
expert-parallel rank ``r`` local expert ``e`` is global expert ``r * num_experts / EP + e``,
``decoder.layers.{i}.mlp.shared_experts.linear_fc{1,2}.weight``).

Losses: the reported ``loss`` is the language-model loss. The router's load-balancing (aux) loss and z-loss are
added to the *gradient* by megatron's ``MoEAuxLossAutoScaler`` (their values are not in ``loss``); with DeepSpeed
dividing the LM loss by the gradient-accumulation steps, the scaler's backward scale is set to the same
``1 / grad_accum_steps`` so each micro-batch's aux loss weighs what its LM loss weighs. Router health (aux loss,
z-loss, per-expert token share min/max/entropy over this rank's tokens, dropped token fraction) comes back as
metrics (``train/<name>``, ``valid/<name>``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from largelm.config import ConfigError, ModelConfig, ParallelConfig
from largelm.model import gpt
from largelm.model.attention import KINDS
from largelm.model.specs import attention_choice, final_norm, gpt_layer_spec, normalization
from largelm.parallel.deepspeed_compat.moe import mark_expert_params
from largelm.parallel.megatron_compat import install_moe_compat
from largelm.parallel.sequence_parallel import SequenceParallelNorm

ROUTER_METRICS = ("aux_loss", "z_loss", "expert_share_min", "expert_share_max", "expert_share_entropy",
                  "dropped_tokens")


def moe_transformer_fields(model_cfg: ModelConfig, parallel_cfg: ParallelConfig) -> dict[str, Any]:
    """TransformerConfig fields of ``model.moe`` and ``parallel.expert_parallel``."""
    moe = model_cfg.moe
    router = moe.router
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.top_k,
        moe_ffn_hidden_size=moe.ffn_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_size,
        moe_layer_freq=moe.layer_freq,
        moe_router_load_balancing_type="aux_loss" if router.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=router.aux_loss_coeff,
        moe_z_loss_coeff=router.z_loss_coeff or None,
        moe_expert_capacity_factor=router.capacity_factor,
        moe_input_jitter_eps=router.input_jitter_eps,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        moe_router_dtype="fp32",  # router logits/softmax in fp32 under bf16 too (routing decisions stay stable)
        expert_model_parallel_size=parallel_cfg.expert_parallel,
    )


def moe_block_spec(model_cfg: ModelConfig, config: TransformerConfig,
                   vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """The layers: megatron's local MoE layer where ``model.moe.is_moe_layer(i)``, the dense llama layer elsewhere,
    both with this model's core attention (and sequence-parallel norms with SP); the final norm as the dense
    GPT's."""
    attention = attention_choice(model_cfg, config)
    dense = gpt_layer_spec(model_cfg, config.sequence_parallel, attention)
    moe_layer = get_gpt_layer_local_spec(num_experts=model_cfg.moe.num_experts, moe_grouped_gemm=False,
                                         normalization=normalization(model_cfg))
    moe_layer.submodules.self_attention.submodules.core_attention = KINDS[attention]
    if config.sequence_parallel:  # as gpt_layer_spec: norms that mark their weights for the SP gradient all-reduce
        moe_layer.submodules.input_layernorm = SequenceParallelNorm
        moe_layer.submodules.pre_mlp_layernorm = SequenceParallelNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    layers = [moe_layer if model_cfg.moe.is_moe_layer(i) else dense for i in range(num_layers)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=final_norm(model_cfg, config.sequence_parallel))


def build_moe_model(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, _section=None, *,
                    dtype: torch.dtype = torch.float32, **overrides: Any):
    """This rank's MoE GPTModel: its TP shard and its ``num_experts / expert_parallel`` experts (needs
    ``init_model_parallel(..., expert_parallel=)``). Expert parameters are marked for DeepSpeed's expert-data-
    parallel reduction (largelm/parallel/deepspeed_compat/moe.py); routers record their routing for the metrics."""
    if model_cfg.arch != "moe" or model_cfg.moe is None:
        raise ConfigError(f"build_moe_model builds model.arch='moe' with model.moe set, got arch={model_cfg.arch!r}")
    ep = parallel_state.get_expert_model_parallel_world_size()
    if ep != parallel_cfg.expert_parallel:
        raise ConfigError(f"parallel.expert_parallel={parallel_cfg.expert_parallel} but megatron parallel_state was "
                          f"initialised with {ep}")
    install_moe_compat()
    fields = {**moe_transformer_fields(model_cfg, parallel_cfg), **overrides}
    model = gpt.build_gpt_model(model_cfg, parallel_cfg, vocab_size=model_cfg.vocab_size, dtype=dtype,
                                block_spec=moe_block_spec, **fields)
    mark_expert_params(model, ep)
    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.register_forward_hook(_record_routing)
    return model


def _record_routing(router: TopKRouter, _inputs, outputs) -> None:
    # outputs = (probs, routing_map [tokens, experts] bool, after capacity dropping)
    routing_map = outputs[1].detach()
    router._largelm_routing = (routing_map.sum(dim=0).float(), routing_map.shape[0])


def router_metrics(model: torch.nn.Module, top_k: int) -> dict[str, torch.Tensor]:
    """Router health of the last forward, as means over the MoE layers; clears megatron's aux-loss tracker.

    ``aux_loss``/``z_loss``: the losses before their coefficients (megatron's tracker). ``expert_share_*``: each
    expert's fraction of the routed (token, expert) assignments on this rank - min, max and entropy in nats
    (``log(num_experts)`` = perfectly balanced). ``dropped_tokens``: fraction of the ``tokens x top_k``
    assignments dropped by the capacity limit (0 when dropless).
    """
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    counts = [m._largelm_routing for m in model.modules() if getattr(m, "_largelm_routing", None) is not None]
    out: dict[str, torch.Tensor] = {}
    for name, key in (("aux_loss", "load_balancing_loss"), ("z_loss", "z_loss")):
        values = tracker.get(key, {}).get("values")
        layers = max(len(counts), 1)
        out[name] = (values.sum() / layers).float() if values is not None else torch.zeros(())
    moe_utils.clear_aux_losses_tracker()
    if counts:
        share_min, share_max, entropy, dropped = [], [], [], []
        for per_expert, tokens in counts:
            routed = per_expert.sum().clamp(min=1.0)
            share = per_expert / routed
            share_min.append(share.min())
            share_max.append(share.max())
            entropy.append(-(share * share.clamp(min=1e-12).log()).sum())
            dropped.append(1.0 - per_expert.sum() / max(tokens * top_k, 1))
        out.update(expert_share_min=torch.stack(share_min).mean(), expert_share_max=torch.stack(share_max).mean(),
                   expert_share_entropy=torch.stack(entropy).mean(), dropped_tokens=torch.stack(dropped).mean())
        for m in model.modules():
            if hasattr(m, "_largelm_routing"):
                m._largelm_routing = None
    return out


def moe_forward_metrics(model: torch.nn.Module, batch: dict, cfg=None) -> dict[str, torch.Tensor]:
    """``{"loss": mean next-token loss, router metrics}`` of a ``tokens`` batch. The aux losses reach the gradient
    through megatron's scaler, scaled by ``1 / train.grad_accum_steps`` as DeepSpeed scales the LM loss."""
    accum = cfg.train.grad_accum_steps if cfg is not None else 1
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / accum))
    loss = gpt.gpt_forward_loss(model, batch["tokens"])[1]
    module = getattr(model, "module", model)
    top_k = module.config.moe_router_topk
    metrics = router_metrics(module, top_k)
    if not module.training:  # megatron computes the aux losses only in training
        metrics.pop("aux_loss"), metrics.pop("z_loss")
    return {"loss": loss, **{k: v.to(loss.device) for k, v in metrics.items()}}


def balanced_entropy(num_experts: int) -> float:
    """The ``expert_share_entropy`` of perfectly balanced routing (nats)."""
    return math.log(num_experts)

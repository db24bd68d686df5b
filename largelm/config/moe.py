"""The ``model.moe`` section (mixture-of-experts GPT, ``model.arch: moe``; largelm/model/moe.py) and its rules
against ``parallel`` (expert parallelism), checked by ``Config`` before any process group starts."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _MoESection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RouterConfig(_MoESection):
    """The MoE router (megatron-core's ``TopKRouter``): softmax over expert logits, top-k choice."""

    # Switch-Transformer load-balancing loss (megatron's ``aux_loss``), weighted into the training loss
    aux_loss_coeff: float = Field(default=1e-2, ge=0)
    # ST-MoE router z-loss (mean squared logsumexp of the router logits); 0: off
    z_loss_coeff: float = Field(default=1e-3, ge=0)
    # None: dropless (every token reaches its top_k experts). A number: each expert takes at most
    # capacity_factor x tokens x top_k / num_experts tokens per micro-batch, the rest are dropped (their MLP output
    # is 0, the residual carries them)
    capacity_factor: Optional[float] = Field(default=None, gt=0)
    # Multiplicative uniform noise in [1-eps, 1+eps] on the router input during training (Switch Transformer); None
    input_jitter_eps: Optional[float] = Field(default=None, gt=0, lt=1)


class MoEConfig(_MoESection):
    """Mixture-of-experts MLPs (``model.arch: moe``; largelm/model/moe.py): megatron-core's ``MoELayer`` with a
    top-k router and ``SequentialMLP`` experts, sharded over ``parallel.expert_parallel`` ranks."""

    num_experts: int = Field(ge=2)
    top_k: int = Field(default=2, ge=1)
    ffn_size: int = Field(gt=0, description="hidden size of one expert's (SwiGLU) MLP")
    router: RouterConfig = Field(default_factory=RouterConfig)
    shared_expert_ffn_size: Optional[int] = Field(default=None, gt=0, description="an always-on shared expert")
    # 1: every layer is MoE; k: layers 0, k, 2k, ... are MoE, the others dense (model.ffn_hidden_size)
    layer_freq: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"model.moe.top_k={self.top_k} exceeds model.moe.num_experts={self.num_experts}")
        return self

    def is_moe_layer(self, layer: int) -> bool:
        """Whether (0-based) ``layer`` has an MoE MLP."""
        return layer % self.layer_freq == 0


def check_moe(m, p) -> None:
    """The cross-section rules of ``model.moe`` (``m``: the ModelConfig) and ``parallel`` (``p``)."""
    if (m.arch == "moe") != (m.moe is not None):
        raise ValueError(f"model.moe is set exactly when model.arch is 'moe' (got arch={m.arch!r}, moe="
                         f"{'set' if m.moe is not None else 'unset'})")
    if m.moe is None:
        if p.expert_parallel > 1:
            raise ValueError(f"parallel.expert_parallel={p.expert_parallel} needs model.arch='moe'")
        return
    if m.style != "llama":
        # megatron-core 0.16.1's expert MLPs add their bias in place on an autograd view (an error) and its
        # shared expert refuses biases: the MoE layer is the bias-free Mixtral/llama layout
        raise ValueError(f"model.style={m.style!r}: model.arch='moe' needs model.style='llama' (SwiGLU experts, "
                         "no biases: the Mixtral layout)")
    if m.moe.num_experts % p.expert_parallel:
        raise ValueError(f"model.moe.num_experts={m.moe.num_experts} is not divisible by "
                         f"parallel.expert_parallel={p.expert_parallel}")
    if p.pipeline_parallel > 1:
        raise ValueError(f"parallel.pipeline_parallel={p.pipeline_parallel}: model.arch='moe' runs without "
                         "pipeline parallelism (use tensor_parallel and expert_parallel; docs/design.md)")
    if p.expert_parallel > 1 and p.zero_stage not in (1, 2):
        raise ValueError(f"parallel.zero_stage={p.zero_stage} with parallel.expert_parallel="
                         f"{p.expert_parallel}: DeepSpeed reduces expert gradients over the expert-data-parallel "
                         "group only in ZeRO stages 1 and 2")
    if p.tensor_parallel > 1 and not p.sequence_parallel:
        raise ValueError(f"parallel.tensor_parallel={p.tensor_parallel} with model.arch='moe' needs "
                         "parallel.sequence_parallel: true (megatron-core's MoE layer refuses to train tensor-"
                         "parallel without it)")


"""DeepSpeed ZeRO for megatron-core's MoE layers: expert gradients reduced over the expert-data-parallel group.

With expert parallelism (EP > 1) the ranks of a data-parallel group hold *different* experts at the same parameter
slot, so expert gradients must be averaged only over the ranks holding the same experts (megatron's
expert-data-parallel group), and ZeRO must partition expert optimizer state over that group. DeepSpeed 0.19.8 does
exactly this for its own MoE: a parameter with ``allreduce=False`` and ``group_name="ep_size_<EP>"`` is an expert
parameter, optimizer groups marked ``moe`` (``deepspeed.moe.utils.split_params_into_different_moe_groups_for_
optimizer``) are reduced and partitioned over ``deepspeed.utils.groups``' expert-data-parallel group of that name,
and the gradient norm is combined over all experts. Three adaptations make it take megatron's MoE:

* ``mark_expert_params``: megatron's local ``SequentialMLP`` experts carry no DeepSpeed marks; they get them (EP > 1
  only: with EP = 1 every data-parallel rank holds every expert and the dense path is the same math).
* ``register_expert_groups``: DeepSpeed's group registry gets *megatron's* expert-parallel and expert-data-parallel
  groups under ``ep_size_<EP>`` (not groups of its own, which could order ranks differently), so the gradients are
  reduced over exactly the ranks megatron's dispatcher treats as holding the same experts.
* ``expert_optimizer_groups`` (scoped to ``deepspeed.initialize``): DeepSpeed only turns its MoE optimizer path on
  when it finds its own ``deepspeed.moe.layer.MoE`` modules; the engine's ``has_moe_layers`` is set while the
  optimizer is built (so ZeRO gets the expert groups) and reset after, so checkpoints keep the ordinary layout
  (ZeRO's per-rank optimizer files hold every rank's expert partition; the module file is written by the
  checkpoint manager's own path).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.utils import groups as ds_groups
from megatron.core import parallel_state

EXPERT_MARK = ".mlp.experts."


def expert_group_name(expert_parallel: int) -> str:
    return f"ep_size_{expert_parallel}"


def mark_expert_params(model: torch.nn.Module, expert_parallel: int) -> int:
    """Mark the routed experts' parameters as DeepSpeed expert parameters (EP > 1); returns how many."""
    if expert_parallel <= 1:
        return 0
    marked = 0
    for name, param in model.named_parameters():
        if EXPERT_MARK in f".{name}":
            param.allreduce = False
            param.group_name = expert_group_name(expert_parallel)
            marked += 1
    return marked


def has_expert_params(model: torch.nn.Module) -> bool:
    return any(is_moe_param(p) for p in model.parameters())


def register_expert_groups(expert_parallel: int) -> None:
    """Give DeepSpeed's group registry megatron's expert groups under ``ep_size_<EP>`` (module docstring)."""
    name = expert_group_name(expert_parallel)
    ep_group = parallel_state.get_expert_model_parallel_group()
    edp_group = parallel_state.get_expert_data_parallel_group()
    ds_groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep_group)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(edp_group)


def expert_param_groups(param_groups: list[dict]) -> list[dict]:
    """``param_groups`` (each with a ``name``) split into dense groups and ``moe`` groups per expert group name
    (DeepSpeed's own splitter)."""
    return split_params_into_different_moe_groups_for_optimizer(param_groups)


@contextlib.contextmanager
def expert_optimizer_groups() -> Iterator[None]:
    """While ``deepspeed.initialize`` runs: an engine whose model has expert parameters builds its (ZeRO) optimizer
    with DeepSpeed's MoE path on; ``has_moe_layers`` is False again once the optimizer exists."""
    original = DeepSpeedEngine._configure_optimizer

    def configure_optimizer(self, client_optimizer, model_parameters):
        moe = has_expert_params(self.module)
        self.has_moe_layers = self.has_moe_layers or moe
        try:
            return original(self, client_optimizer, model_parameters)
        finally:
            if moe:
                self.has_moe_layers = False

    DeepSpeedEngine._configure_optimizer = configure_optimizer
    try:
        yield
    finally:
        DeepSpeedEngine._configure_optimizer = original


def restore_expert_weights(engine) -> bool:
    """After ``engine.load_checkpoint``: give every rank its own experts back (True when there were any).

    DeepSpeed (without its own MoE modules) writes the module file of each model-parallel rank from data-parallel
    rank 0 only, so an expert-parallel rank > 0 loads rank 0's experts into its slots; ZeRO then restores the fp32
    master partitions - every rank's own, experts included - but leaves the model's parameters as loaded until the
    next step. ``update_lp_params`` copies the masters into the parameters and all-gathers them over each group's
    (expert-)data-parallel group, as the end of an optimizer step does; the dense parameters are unchanged by it
    (they were written from these masters)."""
    if not has_expert_params(engine.module):
        return False
    engine.optimizer.update_lp_params()
    return True

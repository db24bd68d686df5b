"""Elastic resume: continue a training checkpoint in another parallel layout (data-parallel size, ZeRO stage,
tensor/pipeline parallel size) with the fp32 master weights, Adam's moments and step count and the LR schedule
carried over exactly.

How (docs/checkpoint_conversion.md "Resharding with optimizer state" says why this and not DeepSpeed's universal
checkpoints): every rank reads the checkpoint's full, layout-independent state - the same zero_to_fp32 merge and
TP unsharding the converter uses for the weights (reader.consolidate_states), applied to ``exp_avg`` and
``exp_avg_sq`` too, which ZeRO keeps in flat partitions of the same layout as the master weights - then builds its
engine for the new layout from those weights (``build_step(init_state_dict=...)``, as a fresh run would) and
writes its shard of masters and moments into whatever optimizer DeepSpeed built, through DeepSpeed's
``safe_set_full_*`` API (largelm.parallel.deepspeed_compat.optimizer_state). The LR scheduler state and the
engine's step/sample counters come from the checkpoint's model-states file. Nothing is rounded on the way: fp32
tensors are cut and copied, so unsharding the new engine gives the checkpoint's tensors bit for bit.

MoE (``model.arch: moe``): the full state numbers experts globally (checkpoint/experts.py merges an EP > 1
checkpoint's expert groups per expert-parallel rank); the new engine's parameters carry megatron's rank-local names
(``mlp.experts.local_experts.<e>``), so expert-parallel rank r of the new layout takes global expert
``r * E/EP + e`` (megatron's contiguous assignment, ``largelm.parallel.sharding.global_expert_name``) for the
weights it is built from (``load_full_state_dict``) and for masters and moments here. So EP may change along with
DP, ZeRO-1/2 and TP; ZeRO-3 with EP > 1 is refused by the config (config/moe.py).

The same model shape is required (``ModelConfig.SHAPE_FIELDS``: preflight refuses anything else).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from largelm.checkpoint.consolidated import Consolidated
from largelm.checkpoint.info import CheckpointInfo, inspect_checkpoint, model_state_files
from largelm.checkpoint.reader import consolidate_states, load_pt
from largelm.config import Config
from largelm.errors import ConversionError
from largelm.model.layout import DISTILL_PROJECTION
from largelm.model.registry import get_arch
from largelm.parallel.deepspeed_compat.optimizer_state import (
    ADAM_KEYS,
    create_adam_state,
    set_adam_step,
    set_full_state,
)
from largelm.parallel.sharding import global_expert_name, shard_tensor


@dataclass
class ReshardSource:
    """A checkpoint's whole training state, independent of the layout that wrote it."""

    info: CheckpointInfo
    weights: Consolidated  # fp32 masters
    moments: dict[str, Consolidated]  # exp_avg, exp_avg_sq
    adam_step: torch.Tensor
    engine_state: dict  # lr_scheduler, global_steps, global_samples, skipped_steps


def read_reshard_source(step_dir: Path) -> ReshardSource:
    """Read and merge every rank's state of the checkpoint in ``step_dir`` (ConversionError when it is not whole,
    e.g. a ZeRO-0 engine of a pipeline model, whose optimizer order cannot be rebuilt)."""
    info = inspect_checkpoint(step_dir, checksums=False)  # the trainer verified the sha256 already
    weights, moments, step = consolidate_states(info, log=lambda _: None, moments=True)
    model_states = load_pt(model_state_files(info, 0)[0])
    engine_state = {k: model_states.get(k) for k in ("lr_scheduler", "global_steps", "global_samples",
                                                     "skipped_steps")}
    if engine_state["lr_scheduler"] is None or engine_state["global_steps"] is None:
        raise ConversionError(f"{step_dir}: the model-states file holds no LR scheduler state or step counter")
    return ReshardSource(info, weights, moments, step, engine_state)


def init_weights(source: ReshardSource, cfg: Config) -> dict[str, torch.Tensor]:
    """The full fp32 weights at this layout's padded vocabulary: what the new engine is built from."""
    return source.weights.padded_tensors(cfg.model.padded_vocab_size(cfg.parallel.tensor_parallel))


def local_shard(name: str, param: torch.nn.Parameter, full: dict, cfg: Config, tp_rank: int,
                ep_rank: int = 0) -> torch.Tensor:
    """This rank's part of the full tensor behind module parameter ``name`` (cut as megatron's partition
    attributes on ``param`` say; a rank-local MoE expert of expert-parallel rank ``ep_rank`` is looked up by its
    global number), fp32."""
    dense = get_arch(cfg.model.arch).dense_name(name, cfg.model)
    if cfg.model.moe is not None:
        dense = global_expert_name(dense, ep_rank, cfg.model.moe.num_experts // cfg.parallel.expert_parallel)
    value = full[dense]
    tp = cfg.parallel.tensor_parallel
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        value = shard_tensor(value, tp_rank, tp, param.partition_dim, getattr(param, "partition_stride", 1))
    return value.float()


def load_into_engine(engine, cfg: Config, source: ReshardSource, tp_rank: int, ep_rank: int = 0) -> None:
    """Collective-free: give this rank's engine (built from ``init_weights``) the checkpoint's masters, moments,
    Adam step, LR schedule and counters. ``tp_rank``/``ep_rank``: this rank's tensor- and expert-parallel rank."""
    if any(name.startswith(DISTILL_PROJECTION + ".") for name, _ in engine.module.named_parameters()):
        raise ConversionError(f"{source.info.path}: elastic resume (another layout) of a distillation run with "
                              "distill.hidden_projection is not supported (the resharded state holds the model's "
                              "tensors only); resume in the checkpoint's own layout")
    padded = cfg.model.padded_vocab_size(cfg.parallel.tensor_parallel)
    weights = init_weights(source, cfg)
    moments = {key: source.moments[key].padded_tensors(padded) for key in ADAM_KEYS}
    create_adam_state(engine)
    for name, param in engine.module.named_parameters():
        set_full_state(engine, param, local_shard(name, param, weights, cfg, tp_rank, ep_rank),
                       {key: local_shard(name, param, moments[key], cfg, tp_rank, ep_rank) for key in ADAM_KEYS})
    set_adam_step(engine, float(source.adam_step))
    state = source.engine_state
    engine.lr_scheduler.load_state_dict(
        scheduler_state(state["lr_scheduler"], len(engine.lr_scheduler.optimizer.param_groups), source.info.path))
    # the optimizer's groups get their LR at the scheduler's next step: the resumed step needs the saved one now
    for group, lr in zip(engine.lr_scheduler.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    engine.global_steps = int(state["global_steps"])
    engine.global_samples = int(state["global_samples"] or 0)
    engine.skipped_steps = int(state["skipped_steps"] or 0)


def scheduler_state(state: dict, groups: int, where: Path) -> dict:
    """The checkpoint's LR scheduler state for an optimizer of ``groups`` parameter groups. The group count depends
    on the layout (with EP > 1 DeepSpeed splits the experts into groups of their own), but largelm's schedule is one
    LambdaLR with one base LR over every group (train/schedule.py): its per-group lists are refitted."""
    out = dict(state)
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        values = state.get(key)
        if values is None or len(values) == groups:
            continue
        if len({repr(v) for v in values}) != 1:
            raise ConversionError(f"{where}: the LR scheduler's {key} differ between parameter groups ({values}); "
                                  f"they cannot be refitted to this layout's {groups} groups")
        out[key] = [values[0]] * groups
    return out


def trainer_state_file(info: CheckpointInfo, rank: int) -> Path:
    return info.path / f"trainer_state_rank{rank:05d}.pt"


def old_rank(info: CheckpointInfo, dp_rank: int) -> int:
    """The checkpoint's global rank holding TP rank 0 of the first pipeline stage in data-parallel rank
    ``dp_rank`` (megatron's order: TP fastest, then DP, then PP)."""
    return info.tensor_parallel * dp_rank

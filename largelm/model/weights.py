"""Load full (TP=1, single-stage) weights into a built model: this rank's tensor-parallel shard of each tensor, and
for a pipeline stage only its own layers (names mapped by the stage module)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core import parallel_state

from largelm.model.pipeline import GPTPipelineModule
from largelm.parallel.sharding import expert_count, local_expert_state_dict, shard_state_dict


def _check_covered(where: str, missing: list[str], unexpected: list[str]) -> None:
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"{where}: full state dict does not fit this model: missing {missing}, unexpected {unexpected}")


def load_full_state_dict(model: torch.nn.Module, full: dict[str, torch.Tensor], tp_rank: Optional[int] = None,
                         tp_size: Optional[int] = None) -> None:
    """Load this rank's part of full (TP=1, single-stage) ``GPTModel`` weights into ``model``, in place.

    ``model`` is this rank's megatron ``GPTModel`` (tensor/data parallel, one pipeline stage: the dense path)
    or its pipeline stage (``largelm.model.pipeline.GPTPipelineModule``, or the BERT pipeline built on it, which
    takes full ``BertModel`` weights): names are mapped with the module's ``full_name_targets`` and a tied word
    embedding is loaded into both the first stage's embedding and the last stage's head. Tensor-parallel
    parameters are cut with ``shard_state_dict`` for TP rank ``tp_rank`` of ``tp_size`` (default: megatron
    parallel_state); MoE experts are numbered globally in ``full`` and this expert-parallel rank takes its own
    (``local_expert_state_dict``). Values are cast to the model's dtype. Every parameter of
    ``model`` must be covered and every key of ``full`` must belong to the model (else ``KeyError``); call it
    *before* wrapping the model in a DeepSpeed engine (ZeRO keeps its own fp32 copy from then on). The padded
    vocabulary size must be the same as the full model's (``make_vocab_size_divisible_by`` x TP divides it).
    """
    if tp_rank is None or tp_size is None:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
    full = {k: v for k, v in full.items() if not k.endswith("_extra_state")}
    # MoE: this expert-parallel rank's experts, renumbered locally (a no-op without experts or EP)
    if expert_count(full):
        full = local_expert_state_dict(full, parallel_state.get_expert_model_parallel_rank(),
                                       parallel_state.get_expert_model_parallel_world_size())
    if not isinstance(model, GPTPipelineModule):
        result = model.load_state_dict(shard_state_dict(full, model, tp_rank, tp_size), strict=False)
        _check_covered(type(model).__name__, result.missing_keys, result.unexpected_keys)
        return
    _load_stage_layers(model, full, lambda wanted, layer: shard_state_dict(wanted, layer, tp_rank, tp_size))


def _load_stage_layers(model: GPTPipelineModule, state: dict[str, torch.Tensor],
                       cut: Callable[[dict, torch.nn.Module], dict]) -> None:
    """Load ``state`` (``GPTModel``/``BertModel`` names; keys of other stages' layers are skipped) into this
    stage's layers, each layer's part passed through ``cut`` (e.g. this rank's TP shard); every parameter of the
    stage must be covered."""
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        for index, key in model.full_name_targets(name):
            if model.stage_layer(index) is not None:
                per_layer.setdefault(index, {})[key] = tensor
    for index in range(model._local_start, model._local_stop):
        layer = model.stage_layer(index)
        if layer is None or not isinstance(layer, torch.nn.Module):
            continue
        if index == model.tied_output_index and model.tied and model.stage_layer(0) is layer:
            continue  # one stage holds both ends of the tie: one module, loaded as layer 0
        wanted = per_layer.get(index, {})
        result = layer.load_state_dict(cut(wanted, layer), strict=False)
        _check_covered(f"pipeline layer {index}", result.missing_keys, result.unexpected_keys)


def load_tp_shard_state_dict(model: torch.nn.Module, shard: dict[str, torch.Tensor]) -> None:
    """Load weights that are already this rank's tensor-parallel shard (a checkpoint of the same TP, read per TP
    rank) into a dense ``GPTModel`` or a pipeline stage (``GPTPipelineModule``: names mapped as in
    ``load_full_state_dict``, a tied word embedding into both ends; ``shard`` may hold only this stage's weights),
    in place; the same coverage check as ``load_full_state_dict``."""
    shard = {k: v for k, v in shard.items() if not k.endswith("_extra_state")}
    if isinstance(model, GPTPipelineModule):
        _load_stage_layers(model, shard, lambda wanted, _layer: wanted)
        return
    result = model.load_state_dict(shard, strict=False)
    _check_covered(type(model).__name__, result.missing_keys, result.unexpected_keys)

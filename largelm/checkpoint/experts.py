"""ZeRO-1/2 partitions of an expert-parallel (MoE, ``parallel.expert_parallel`` > 1) checkpoint -> full tensors with
global expert names.

With EP > 1 DeepSpeed's MoE optimizer path (largelm/parallel/deepspeed_compat/moe.py) keeps the routed experts'
parameters in their own parameter groups, partitioned over megatron's expert-data-parallel group (DP / EP ranks
holding the same experts) instead of the data-parallel group: the optimizer files record it as a per-group
``partition_count`` (e.g. ``[2, 2, 1]`` at DP=2, EP=2). The model-states file (written by data-parallel rank 0)
lists every group's parameters with *rank-local* expert names (``local_experts.0 .. E/EP-1``), the same on every
expert-parallel rank. So zero_to_fp32's merge, which assumes one partition count, runs twice:

* once over the dense groups and all DP partitions;
* once per expert-parallel rank r over the expert groups of the DP ranks that hold r's experts - megatron orders
  expert ranks ``tp-ep-dp-pp`` within the same ranks its dense order ``tp-dp-pp`` numbers, so DP rank d holds EP
  rank ``d % EP`` (expert-data-parallel rank ``d // EP``) - and its local expert e is renamed global expert
  ``r * E/EP + e`` (``largelm.parallel.sharding.global_expert_name``).

tests/test_convert_moe.py checks the result against the live fp32 masters of a 2-rank EP=2 run.
"""

from __future__ import annotations

from dataclasses import replace

from largelm.errors import ConversionError
from largelm.parallel.sharding import expert_count, global_expert_name


def merge_zero12(z, partitions: int, counts, flat_groups: list, model_states: list, paddings: list) -> dict:
    """zero_to_fp32's ZeRO-1/2 merge (module ``z``) of one model-parallel rank, expert groups joined over the
    expert-parallel ranks. ``counts``: the optimizer's per-group partition counts (an int: no expert groups);
    ``flat_groups``/``paddings``: per DP file, its flat fp32 groups and parameter alignment paddings."""
    counts = list(counts) if isinstance(counts, (list, tuple)) else [int(counts)] * len(flat_groups[0])
    expert = [g for g, c in enumerate(counts) if c != partitions]
    if not expert:
        return z._get_fp32_state_dict_from_zero2_checkpoint(partitions, flat_groups, model_states, False, paddings[0])
    dense = [g for g in range(len(counts)) if g not in expert]
    expert_dp = {counts[g] for g in expert}
    if len(expert_dp) != 1 or partitions % next(iter(expert_dp)):
        raise ConversionError(f"expert parameter groups partitioned over {sorted(expert_dp)} ranks do not divide "
                              f"the {partitions} data-parallel ranks")
    ep = partitions // expert_dp.pop()

    def pick(per_file: list, groups: list[int]) -> list:
        return [per_file[g] for g in groups]

    def subset(states: list, groups: list[int], **changes) -> list:
        return [replace(s, param_shapes=pick(s.param_shapes, groups), **changes) for s in states]

    def group_paddings(file: int, groups: list[int]):
        return pick(paddings[file], groups) if paddings[file] is not None else None

    merged = z._get_fp32_state_dict_from_zero2_checkpoint(
        partitions, [pick(f, dense) for f in flat_groups], subset(model_states, dense), False, group_paddings(0, dense))
    # the expert groups hold no buffers, shared or frozen parameters (those are in the dense merge)
    expert_states = subset(model_states[:1], expert, buffers={}, shared_params=[], frozen_param_shapes=None,
                           frozen_param_fragments=None)
    local = expert_count(n for shapes in expert_states[0].param_shapes for n in shapes)
    for ep_rank in range(ep):
        members = [d for d in range(partitions) if d % ep == ep_rank]
        part = z._get_fp32_state_dict_from_zero2_checkpoint(
            len(members), [pick(flat_groups[d], expert) for d in members], expert_states, False,
            group_paddings(members[0], expert))
        for name, tensor in part.items():
            full = global_expert_name(name, ep_rank, local)
            if full in merged:
                raise ConversionError(f"expert parameter {full} appears in two expert-parallel ranks' partitions")
            merged[full] = tensor
    return merged

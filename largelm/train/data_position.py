"""Where the data loader resumes: the one place that decides it, for a plain resume and a resharded one.

A checkpoint holds every rank's own loader state (exact per rank and worker slot) and, in the first data-parallel
replica's trainer state, the layout-independent position merged from all of them (``largelm.data.merge_loader_states``;
docs/fault_tolerance.md, "Elastic data position"). On resume:

* same data-parallel size and loader workers: each rank continues its counterpart's own state - the exact, bitwise
  path (also after a ZeRO-stage-only change);
* anything else (another data-parallel size, another worker count): every rank loads the merged position and takes
  its share of what remains of each epoch - no sample repeated, none skipped;
* a checkpoint without a merged position (older largelm, a converted checkpoint) resumes only on its own layout: a
  ``DataError`` says so rather than starting the epoch over.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state

from largelm.data import DataError, merge_loader_states


def with_global_position(loader, dp_rank: int, dp_size: int) -> dict:
    """This rank's loader state to save; the first data-parallel replica's also carries the merged, layout-
    independent position. Collective over the data-parallel group."""
    data = loader.state_dict()
    every = [None] * dp_size
    dist.all_gather_object(every, data, group=parallel_state.get_data_parallel_group())
    if dp_rank == 0:
        data["global"] = merge_loader_states(every)
    return data


def _merged(first: dict, dp_size: int, num_workers: int) -> dict:
    if first.get("kind") == "global":  # a converted checkpoint gives every rank the merged position itself
        return first
    merged = first.get("global")
    if merged is None:
        raise DataError(f"the checkpoint's loader state was written by {first.get('world_size')} data-parallel "
                        f"ranks x {first.get('num_workers')} workers without a layout-independent data position "
                        f"(an older largelm, or a converted checkpoint): it resumes only with that layout, this run "
                        f"has {dp_size} x {num_workers}")
    return merged


def loader_state(loader, own: dict, rank: int, dp_size: int) -> dict:
    """Plain resume (same parallel layout): this rank's own state when the data layout is unchanged, else the
    merged position that rank 0's state carries. Collective: rank 0 decides, so no rank takes another path."""
    decision = [None]
    if rank == 0 and not loader.same_layout(own):
        decision = [_merged(own, dp_size, loader.num_workers)]
    dist.broadcast_object_list(decision, src=0)
    return own if decision[0] is None else decision[0]


def resharded(old_states: list[dict], loader, dp_rank: int, dp_size: int) -> tuple[dict, str]:
    """Resharded resume: ``old_states`` are the checkpoint's loader states by old data-parallel rank (every rank
    reads the same files, so every rank decides alike). Returns (the state to load, the note rank 0 prints)."""
    if len(old_states) == dp_size and loader.same_layout(old_states[dp_rank]):
        return old_states[dp_rank], "carried exactly (same data-parallel size and loader workers)"
    merged = _merged(old_states[0], dp_size, loader.num_workers)
    return merged, (f"carried: the layout-independent position of {len(old_states)} data-parallel ranks, shared "
                    f"among {dp_size} (none repeated, none skipped)")

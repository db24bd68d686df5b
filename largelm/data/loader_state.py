"""The training loader's resume state: checking it, and merging every rank's into one layout-independent state.

Two kinds of state (field ``kind``):

* ``"rank"`` - what ``TokenLoader.state_dict()`` returns: one data-parallel rank's exact position (per reader
  slot: blend index and per dataset ``(epoch, offset)`` into the slot's shuffled stream) plus its part of the
  layout-independent record (per dataset: the record its layout started from and the positions it consumed, see
  ``largelm.data.position``). Valid for the same rank, world size and worker count only; resumes bit-identically.
* ``"global"`` - what ``merge_loader_states`` makes of *all* ranks' ``"rank"`` states of one moment: per dataset
  the global record. Valid for any world size and worker count: every reader of the new layout takes its share
  of each epoch's remainder.

Both record the settings they are valid for; a resume with other ones is refused naming each field. Malformed or
tampered states are refused with ``DataError`` naming the field.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

from largelm.data.format import DataError
from largelm.data.position import DatasetPosition, RankRecord, merge_positions, non_negative_int, parse_epoch_ranges

STATE_VERSION = 2  # 2: layout-independent data position (kind, position); 1 is still read for an exact resume
LAYOUT_FIELDS = ("rank", "world_size", "num_workers")  # what a "global" state is independent of
# What the record of consumed samples does not depend on: a global state resumes under other values too.
_GLOBAL_FREE = (*LAYOUT_FIELDS, "batch_size", "shuffle_buffer")
_FIELDS = (*LAYOUT_FIELDS, "seed", "batch_size", "seq_length", "shuffle_buffer", "infinite")


def check_version(state) -> int:
    if not isinstance(state, dict):
        raise DataError(f"loader state: expected a mapping, got {type(state).__name__}")
    version = state.get("version")
    if version not in (1, STATE_VERSION):
        raise DataError(f"loader state has version {version!r}, expected {STATE_VERSION}")
    kind = state.get("kind", "rank")
    if kind not in ("rank", "global") or (kind == "global" and version != STATE_VERSION):
        raise DataError(f"loader state field kind: {kind!r} is not 'rank' or 'global'")
    return version


def differences(state: dict, mine: dict) -> list[str]:
    """The settings ``state`` was written with vs this loader's (``mine``: ``TokenLoader._identity()``)."""
    free = _GLOBAL_FREE if state.get("kind") == "global" else ()
    out = [
        f"{key}: state has {state.get(key)!r}, loader has {mine[key]!r}"
        for key in _FIELDS if key not in free and state.get(key) != mine[key]
    ]
    out += _transform_differences(state, mine)
    theirs = state.get("datasets") or []
    if len(theirs) != len(mine["datasets"]):
        out.append(f"datasets: state has {len(theirs)}, loader has {len(mine['datasets'])}")
        return out
    for i, (a, b) in enumerate(zip(theirs, mine["datasets"])):
        if not isinstance(a, dict):
            out.append(f"datasets[{i}]: state has {a!r:.80}, not a dataset entry")
            continue
        if a.get("fingerprint") != b["fingerprint"]:
            out.append(
                f"datasets[{i}] ({b['path']}): contents differ from the state's {a.get('path')!r} "
                f"(fingerprint {str(a.get('fingerprint'))[:12]} vs {b['fingerprint'][:12]})"
            )
        if a.get("weight") != b["weight"]:
            out.append(f"datasets[{i}] ({b['path']}): weight {a.get('weight')!r} in state, {b['weight']!r} now")
    return out


def _transform_differences(state: dict, mine: dict) -> list[str]:
    """The sample transform's settings (e.g. BERT masking) in the state vs this loader, field by field."""
    if "sample_transform" not in mine:
        theirs = state.get("sample_transform")
        return [] if theirs is None else [f"sample_transform: state has {theirs!r}, loader has None"]
    ours = mine["sample_transform"]
    if "sample_transform" not in state:
        # Written before the loader recorded its sample transform: there is nothing to compare against.
        warnings.warn("loader state has no sample_transform settings (written by an older largelm): resuming "
                      "without checking that they match this loader's", stacklevel=4)
        return []
    theirs = state["sample_transform"]
    if not isinstance(theirs, dict):
        return [f"sample_transform: state has {theirs!r}, loader has {ours!r}"]
    keys = list(ours) + [k for k in theirs if k not in ours]
    return [
        f"sample_transform.{key}: state has {theirs.get(key)!r}, loader has {ours.get(key)!r}"
        for key in keys
        if theirs.get(key) != ours.get(key)
    ]


def count(state: dict, key: str) -> int:
    return non_negative_int(state.get(key), key)


def optional_count(state: dict, key: str) -> int:
    """A count that states written by older largelm lack (``retries``): 0 there."""
    return count(state, key) if key in state else 0


def parse_slots(state: dict, num_slots: int, num_datasets: int) -> list[Optional[dict]]:
    """The per-slot positions of a ``"rank"`` state, checked field by field."""
    slots = state.get("slots")
    if not isinstance(slots, list) or len(slots) != num_slots:
        raise DataError(f"loader state field slots: expected a list of {num_slots} reader slots, got "
                        f"{slots!r:.80}")
    out: list[Optional[dict]] = []
    for i, s in enumerate(slots):
        if s is None:
            out.append(None)
            continue
        positions = s.get("positions") if isinstance(s, dict) else None
        if not isinstance(positions, list) or len(positions) != num_datasets:
            raise DataError(f"loader state field slots[{i}].positions: expected {num_datasets} [epoch, offset] "
                            f"pairs, got {positions!r:.80}")
        pairs = []
        for d, p in enumerate(positions):
            where = f"slots[{i}].positions[{d}]"
            if not (isinstance(p, (list, tuple)) and len(p) == 2):
                raise DataError(f"loader state field {where}: expected [epoch, offset], got {p!r:.80}")
            pairs.append([non_negative_int(p[0], f"{where}[0] (epoch)"),
                          non_negative_int(p[1], f"{where}[1] (offset)")])
        out.append({"samples": non_negative_int(s.get("samples"), f"slots[{i}].samples"), "positions": pairs})
    if not 0 <= count(state, "next_slot") < num_slots:
        raise DataError(f"loader state field next_slot: {state['next_slot']} is outside 0..{num_slots - 1}")
    return out


def slot_epochs(slots: Sequence[Optional[dict]], d: int, start_epoch: int) -> list[int]:
    """Each slot's current epoch of dataset ``d`` (a slot that has produced nothing starts at ``start_epoch``)."""
    return [start_epoch if s is None else s["positions"][d][0] for s in slots]


def parse_rank_records(state: dict, slots: Sequence[Optional[dict]], sizes: Optional[Sequence[int]]
                       ) -> list[RankRecord]:
    """Per dataset, the rank's part of the global record (``sizes``: the datasets' sample counts, None: any)."""
    position = state.get("position")
    num = len(state.get("datasets") or [])
    if not isinstance(position, list) or len(position) != num:
        raise DataError(f"loader state field position: expected one entry per dataset ({num}), got "
                        f"{position!r:.80}")
    records = []
    for d, item in enumerate(position):
        where = f"position[{d}]"
        if not isinstance(item, dict):
            raise DataError(f"loader state field {where}: expected a mapping, got {item!r:.80}")
        base = DatasetPosition.from_json(item.get("base"), f"{where}.base", None if sizes is None else sizes[d])
        consumed = parse_epoch_ranges(item.get("consumed"), f"{where}.consumed", base.num_samples)
        first = min(slot_epochs(slots, d, base.complete_before))
        if any(e < first for e in consumed):
            raise DataError(f"loader state field {where}.consumed: lists epochs before {first}, which every reader "
                            "has finished")
        tracked = non_negative_int(item.get("tracked_from", 0), f"{where}.tracked_from")
        records.append(RankRecord(base, consumed, first, tracked))
    return records


def merge_loader_states(states: Sequence[dict]) -> dict:
    """The layout-independent (``"global"``) state from the ``"rank"`` states of *every* data-parallel rank taken
    at the same moment (e.g. all gathered at a checkpoint), in any order. Ranks holding the same data-parallel rank
    (tensor/pipeline peers) give one state between them."""
    if not states:
        raise DataError("merge_loader_states: no loader states given")
    by_rank: dict[int, dict] = {}
    for state in states:
        if check_version(state) != STATE_VERSION or state.get("kind", "rank") != "rank":
            raise DataError("merge_loader_states: every state must be a per-rank state of version "
                            f"{STATE_VERSION} (written by TokenLoader.state_dict), got version "
                            f"{state.get('version')!r} kind {state.get('kind')!r}")
        by_rank.setdefault(count(state, "rank"), state)
    first = states[0]
    world = count(first, "world_size")
    if sorted(by_rank) != list(range(world)):
        raise DataError(f"merge_loader_states: need one state of each rank 0..{world - 1} (world_size "
                        f"{world}), got ranks {sorted(by_rank)}")
    for rank, state in by_rank.items():
        changed = [k for k in first if k not in ("rank", "consumed_batches", "bad_samples", "retries", "next_slot",
                                                 "slots", "position") and state.get(k) != first[k]]
        if changed:
            raise DataError(f"merge_loader_states: rank {rank}'s loader state differs from the first one in "
                            f"{changed} (states of one run and one moment only)")
    num_slots = max(count(first, "num_workers"), 1)
    num_datasets = len(first.get("datasets") or [])
    records = []
    for rank in range(world):
        state = by_rank[rank]
        slots = parse_slots(state, num_slots, num_datasets)
        records.append(parse_rank_records(state, slots, None))
        for d, record in enumerate(records[-1]):
            if record.first_epoch < record.tracked_from:
                raise DataError(
                    f"merge_loader_states: rank {rank} resumed from a loader state written before data positions "
                    f"were recorded; what it consumed of dataset {d} ({first['datasets'][d].get('path')}) before "
                    f"epoch {record.tracked_from} is unknown, so its position cannot move to another layout until "
                    "every reader has reached that epoch"
                )
    positions = []
    for d in range(num_datasets):
        sizes = {records[r][d].base.num_samples for r in range(world)}
        if len(sizes) != 1:
            raise DataError(f"merge_loader_states: position[{d}].base.num_samples differs between ranks: {sizes}")
        positions.append(merge_positions([records[r][d] for r in range(world)], sizes.pop()).to_json())
    merged = {k: v for k, v in first.items() if k not in (*LAYOUT_FIELDS, "consumed_batches", "next_slot", "slots",
                                                          "position", "bad_samples", "retries")}
    return {**merged, "kind": "global", "version": STATE_VERSION,
            "bad_samples": sum(count(s, "bad_samples") for s in by_rank.values()),
            "retries": sum(optional_count(s, "retries") for s in by_rank.values()),
            "written_by": {"world_size": world, "num_workers": first.get("num_workers")},
            "position": positions}

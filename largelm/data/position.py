"""Layout-independent data position: which samples of each dataset's epochs a run has consumed.

Every epoch of a dataset has one global order, independent of the data-parallel layout: the epoch's shard
permutation (``shards.epoch_shards``, seeded by seed, dataset and epoch) laid end to end. A sample's *position*
is its index in that order. A layout (R ranks x W workers) reads, of epoch ``e``, the positions still
*remaining* in ``e``: rank ``r`` takes the ``r``-th of R contiguous equal pieces of them (``take_part``), its
worker ``w`` the ``w``-th of W pieces of that, and shuffles its piece with its seeded buffer.

``DatasetPosition`` is the global record of one dataset: epochs before ``complete_before`` are fully consumed;
for the listed epochs, the ranges of positions that remain; every other epoch is untouched (all remains). A
fresh run starts from the empty record (nothing listed), so its pieces are exactly the whole-epoch split.

Each rank's loader records, per dataset and epoch, the positions it has handed out (``ConsumedSet``: a few
ranges - a reader's consumption is its piece's prefix minus the samples still in its shuffle buffer). At a
checkpoint ``merge_positions`` combines every rank's record (``rank_remaining``: the rank's piece of the epoch
minus what it consumed; nothing for epochs all its readers have finished) into the global record. A run with
another layout starts from it: every reader takes its piece of each epoch's remainder, so over the epochs in
progress the samples consumed before the change and after it are exactly one pass - none repeated, none skipped.

A bad sample skipped (``skip_bad_samples``) in an epoch still in progress is not a consumed position: after a
layout change it is read, skipped and counted again.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from largelm.data.format import DataError
from largelm.data.shards import ShardRange, take_part

Range = tuple[int, int]  # half-open [start, stop) of positions in an epoch's global order


def take_positions(ranges: Sequence[Range], part: int, num_parts: int) -> list[Range]:
    """The ``part``-th of ``num_parts`` contiguous equal pieces of the ranges laid end to end (``take_part``)."""
    pieces = take_part([ShardRange("", a, b) for a, b in ranges], part, num_parts)
    return [(r.start, r.stop) for r in pieces]


def restrict(shards: Sequence[ShardRange], ranges: Sequence[Range]) -> list[ShardRange]:
    """The parts of an epoch's shard sequence whose positions lie in ``ranges`` (sorted, disjoint), in order."""
    out, i = [], 0
    for r in shards:
        end = r.position + r.size
        while i < len(ranges) and ranges[i][1] <= r.position:
            i += 1
        j = i
        while j < len(ranges) and ranges[j][0] < end:
            begin, stop = max(ranges[j][0], r.position), min(ranges[j][1], end)
            out.append(ShardRange(r.path, r.start + begin - r.position, r.start + stop - r.position, begin))
            j += 1
    return out


def union(*range_lists: Iterable[Range]) -> list[Range]:
    merged: list[list[int]] = []
    for a, b in sorted(r for ranges in range_lists for r in ranges):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        elif a < b:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def subtract(ranges: Sequence[Range], removed: Sequence[Range]) -> list[Range]:
    """Positions of ``ranges`` not in ``removed`` (both sorted and disjoint)."""
    out, i = [], 0
    for a, b in ranges:
        while i < len(removed) and removed[i][1] <= a:
            i += 1
        j = i
        while j < len(removed) and removed[j][0] < b:
            if removed[j][0] > a:
                out.append((a, removed[j][0]))
            a = max(a, removed[j][1])
            j += 1
        if a < b:
            out.append((a, b))
    return out


class ConsumedSet:
    """Positions handed out in one epoch, as sorted disjoint ranges (grown one position at a time)."""

    def __init__(self, ranges: Iterable[Range] = ()):
        self._starts: list[int] = []
        self._stops: list[int] = []
        for a, b in ranges:
            self._starts.append(a)
            self._stops.append(b)

    def add(self, p: int) -> None:
        i = bisect.bisect_right(self._starts, p) - 1
        if i >= 0 and p < self._stops[i]:
            raise DataError(f"position {p} handed out twice in one epoch (loader bug)")
        joins_left = i >= 0 and self._stops[i] == p
        joins_right = i + 1 < len(self._starts) and self._starts[i + 1] == p + 1
        if joins_left and joins_right:
            self._stops[i] = self._stops.pop(i + 1)
            self._starts.pop(i + 1)
        elif joins_left:
            self._stops[i] = p + 1
        elif joins_right:
            self._starts[i + 1] = p
        else:
            self._starts.insert(i + 1, p)
            self._stops.insert(i + 1, p + 1)

    def ranges(self) -> list[Range]:
        return list(zip(self._starts, self._stops))


@dataclass
class DatasetPosition:
    """Global record of one dataset (see the module docstring)."""

    num_samples: int
    complete_before: int = 0
    remaining: dict[int, list[Range]] = field(default_factory=dict)

    def remaining_in(self, epoch: int) -> list[Range]:
        if epoch < self.complete_before:
            return []
        return self.remaining.get(epoch, [(0, self.num_samples)])

    def trimmed(self, first_epoch: int) -> "DatasetPosition":
        """The same record for a reader that never looks at epochs before ``first_epoch``."""
        start = max(self.complete_before, first_epoch)
        return DatasetPosition(self.num_samples, start, {e: r for e, r in self.remaining.items() if e >= start})

    def to_json(self) -> dict:
        return {"num_samples": self.num_samples, "complete_before": self.complete_before,
                "remaining": [[e, [list(r) for r in self.remaining[e]]] for e in sorted(self.remaining)]}

    @classmethod
    def from_json(cls, obj, where: str, num_samples: Optional[int] = None) -> "DatasetPosition":
        """Parse and check a record; ``num_samples``: the dataset's size it must have (None: any)."""
        if not isinstance(obj, dict):
            raise DataError(f"loader state field {where}: expected a mapping, got {obj!r:.80}")
        if num_samples is None:
            num_samples = non_negative_int(obj.get("num_samples"), f"{where}.num_samples")
        if obj.get("num_samples") != num_samples:
            raise DataError(f"loader state field {where}.num_samples: state has {obj.get('num_samples')!r}, the "
                            f"dataset has {num_samples}")
        start = non_negative_int(obj.get("complete_before"), f"{where}.complete_before")
        remaining = parse_epoch_ranges(obj.get("remaining"), f"{where}.remaining", num_samples)
        early = sorted(e for e in remaining if e < start)
        if early:
            raise DataError(f"loader state field {where}.remaining: lists epochs {early}, before complete_before "
                            f"({start})")
        return cls(num_samples, start, remaining)


def parse_epoch_ranges(obj, where: str, num_samples: int) -> dict[int, list[Range]]:
    """``[[epoch, [[start, stop], ...]], ...]`` -> {epoch: ranges}, checked: distinct epochs; ranges sorted,
    disjoint, non-empty and inside the dataset."""
    if not isinstance(obj, list):
        raise DataError(f"loader state field {where}: expected a list of [epoch, ranges], got {obj!r:.80}")
    out: dict[int, list[Range]] = {}
    for k, item in enumerate(obj):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], (list, tuple))):
            raise DataError(f"loader state field {where}[{k}]: expected [epoch, [[start, stop], ...]], got "
                            f"{item!r:.80}")
        epoch = non_negative_int(item[0], f"{where}[{k}][0] (epoch)")
        if epoch in out:
            raise DataError(f"loader state field {where}: epoch {epoch} listed twice")
        ranges, last = [], 0
        for i, r in enumerate(item[1]):
            name = f"{where}[{k}] (epoch {epoch}) range {i}"
            if not (isinstance(r, (list, tuple)) and len(r) == 2):
                raise DataError(f"loader state field {name}: expected [start, stop], got {r!r:.80}")
            a, b = non_negative_int(r[0], name), non_negative_int(r[1], name)
            if not last <= a < b <= num_samples or (ranges and a == last):
                raise DataError(f"loader state field {name}: [{a}, {b}) is not a sorted, disjoint, non-empty range "
                                f"inside the dataset's {num_samples} samples")
            ranges.append((a, b))
            last = b
        out[epoch] = ranges
    return out


def non_negative_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"loader state field {where}: expected a non-negative integer, got {value!r:.80}")
    return value


def rank_remaining(base: DatasetPosition, consumed: dict[int, list[Range]], first_epoch: int, last_epoch: int,
                   rank: int, world_size: int) -> dict[int, list[Range]]:
    """Of each epoch ``first_epoch..last_epoch``, what remains of the rank's piece (its readers' epochs are all
    ``>= first_epoch``: it has finished its piece of every earlier epoch)."""
    return {
        e: subtract(take_positions(base.remaining_in(e), rank, world_size), consumed.get(e, []))
        for e in range(first_epoch, last_epoch + 1)
    }


@dataclass
class RankRecord:
    """One rank's contribution to a dataset's global record."""

    base: DatasetPosition  # the global record the rank's layout started from
    consumed: dict[int, list[Range]]  # positions the rank handed out, per epoch (epochs >= first_epoch)
    first_epoch: int  # the earliest epoch any of its readers is in
    tracked_from: int = 0  # consumption of earlier epochs unknown (resumed from a state that did not record it)

    def last_epoch(self) -> int:
        return max([self.first_epoch, *self.consumed, *self.base.remaining])


def merge_positions(records: Sequence[RankRecord], num_samples: int) -> DatasetPosition:
    """The global record of one dataset from every rank's record (index = rank, ``len`` = world size)."""
    world_size = len(records)
    first = min(r.first_epoch for r in records)
    last = max(r.last_epoch() for r in records)
    per_rank = [rank_remaining(r.base, r.consumed, r.first_epoch, last, rank, world_size)
                for rank, r in enumerate(records)]
    remaining = {e: union(*(rem.get(e, []) for rem in per_rank)) for e in range(first, last + 1)}
    while first in remaining and not remaining[first]:
        del remaining[first]
        first += 1
    full = [(0, num_samples)]
    return DatasetPosition(num_samples, first, {e: r for e, r in remaining.items() if r != full})

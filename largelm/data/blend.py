"""Weighted blending of several datasets: which dataset the i-th sample of a reader stream comes from.

The choice for sample ``i`` depends only on (seed, rank, worker slot, i): choices are drawn in fixed blocks
of ``BLOCK`` samples, each block from its own seeded generator. So the schedule is deterministic, and a
resumed reader jumps straight to sample ``i`` without replaying earlier draws.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from largelm.data.shards import SEED_BLEND, seed_words


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    if not weights:
        raise ValueError("at least one dataset is needed")
    for i, w in enumerate(weights):
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise ValueError(f"dataset weight #{i} must be a positive finite number, got {w!r}")
    arr = np.asarray(weights, dtype=np.float64)
    return arr / arr.sum()


class BlendSchedule:
    BLOCK = 4096

    def __init__(self, weights: Sequence[float], *, seed: int, rank: int, slot: int):
        self.probabilities = normalize_weights(weights)
        self._cumulative = np.cumsum(self.probabilities)
        self._cumulative[-1] = 1.0  # guard against rounding leaving the last bucket unreachable
        self._seed = (seed, rank, slot)
        self._block = -1
        self._choices: np.ndarray | None = None

    def _draw_block(self, block: int) -> np.ndarray:
        seed, rank, slot = self._seed
        rng = np.random.default_rng(seed_words(seed, SEED_BLEND, rank, slot, block))
        return np.searchsorted(self._cumulative, rng.random(self.BLOCK), side="right")

    def source(self, i: int) -> int:
        """Index of the dataset that supplies sample ``i`` of this reader's stream."""
        if len(self.probabilities) == 1:
            return 0
        block, within = divmod(i, self.BLOCK)
        if block != self._block:
            self._choices, self._block = self._draw_block(block), block
        return int(self._choices[within])

    def counts(self, n: int) -> list[int]:
        """How many of the first ``n`` samples come from each dataset."""
        totals = np.zeros(len(self.probabilities), dtype=np.int64)
        for block in range(math.ceil(n / self.BLOCK)):
            take = min(self.BLOCK, n - block * self.BLOCK)
            totals += np.bincount(self._draw_block(block)[:take], minlength=len(totals))
        return totals.tolist()

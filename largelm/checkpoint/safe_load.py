"""Load checkpoints without running code from them: ``weights_only`` unpickling with an explicit allowlist.

``torch.load(weights_only=False)`` - what DeepSpeed's ``TorchCheckpointEngine`` does - executes whatever a pickle
tells it to (``__reduce__`` -> ``os.system``). A checkpoint downloaded from somewhere, or a checkpoint directory
writable by someone else, is then remote code execution. Here every checkpoint file is read with PyTorch's
restricted unpickler, which builds only tensors, containers, primitive types and the few classes listed in
``SAFE_GLOBALS`` (the non-tensor objects DeepSpeed 0.19 stores in its optimizer states). Anything else is refused
with ``UnsafeCheckpointError`` naming the file and the offending global, before any of it is executed.

Checksums (``manifest.json``) protect against corruption, not against an attacker, who can rewrite the manifest
too; this module is the security boundary.

* ``safe_torch_load(path)``: ``torch.load`` for checkpoint files (used by the checkpoint manager and tools).
* ``install_safe_checkpoint_engine(engine)``: make a DeepSpeed engine load through ``safe_torch_load``.
* ``forced_weights_only()``: context in which *every* ``torch.load`` is weights-only, even calls that pass
  ``weights_only=False`` (DeepSpeed's universal-checkpoint paths call ``torch.load`` directly).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds Python objects outside the allowlist (refused, nothing was executed)."""


def _safe_globals() -> list:
    """Classes DeepSpeed pickles into checkpoints besides tensors and plain containers (checked for 0.19.8)."""
    found = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        found += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # tools that read checkpoints without DeepSpeed installed
        pass
    return found


SAFE_GLOBALS = _safe_globals()


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` that cannot execute code: weights_only with ``SAFE_GLOBALS`` allowed."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).split("\n", 1)[0].replace("Weights only load failed. ", "")
        raise UnsafeCheckpointError(
            f"refused to load {path}: it contains Python objects that are not plain data ({reason}). "
            "Loading it could execute code; checkpoints are read with weights_only=True "
            "(largelm.checkpoint.safe_load.SAFE_GLOBALS lists the classes allowed)"
        ) from None


try:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
except ImportError:  # pragma: no cover - DeepSpeed is a dependency; tools may run without it
    TorchCheckpointEngine = object


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with the unpickler restricted (saving is unchanged)."""

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)


def install_safe_checkpoint_engine(engine) -> None:
    """Make ``engine`` (a DeepSpeedEngine) read checkpoints through ``safe_torch_load``.

    Only DeepSpeed's default torch engine is replaced (class swap, state kept); another configured engine
    (decoupled / fast writer) is left alone, and ``forced_weights_only`` still covers its loads.
    """
    current = getattr(engine, "checkpoint_engine", None)
    if current is not None and type(current) is TorchCheckpointEngine:
        current.__class__ = SafeTorchCheckpointEngine


@contextlib.contextmanager
def forced_weights_only() -> Iterator[None]:
    """Every ``torch.load`` in this block is weights-only with ``SAFE_GLOBALS`` (PyTorch's
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides an explicit ``weights_only=False``). Not thread-safe: use it
    around a load in the main thread (DataLoader workers are separate processes)."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous

"""DeepSpeed 0.19.8 checkpoint files without running code from them: ``weights_only`` unpickling with an explicit
allowlist (entries ``safe_checkpoint_engine`` and ``forced_weights_only`` of
``largelm.parallel.deepspeed_compat.PATCHES``).

``torch.load(weights_only=False)`` - what DeepSpeed's ``TorchCheckpointEngine`` does - executes whatever a pickle
tells it to (``__reduce__`` -> ``os.system``). A checkpoint downloaded from somewhere, or a checkpoint directory
writable by someone else, is then remote code execution. Here every checkpoint file is read with PyTorch's
restricted unpickler, which builds only tensors, containers, primitive types and the few classes listed in
``SAFE_GLOBALS`` (the non-tensor objects DeepSpeed 0.19 stores in its optimizer states). Anything else is refused
with ``UnsafeCheckpointError`` naming the file and the offending global, before any of it is executed.

Checksums (``manifest.json``) protect against corruption, not against an attacker, who can rewrite the manifest
too; this module is the security boundary.

* ``safe_torch_load(path)``: ``torch.load`` for checkpoint files (used by the checkpoint manager and tools).
* ``install_safe_checkpoint_engine(engine)``: make a DeepSpeed engine load through ``safe_torch_load`` (and
  keep a failed write for ``take_write_error`` instead of raising it between DeepSpeed's collectives).
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
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from largelm.fileio import torch_save_durable


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds Python objects outside the allowlist (refused, nothing was executed)."""


# Classes DeepSpeed pickles into checkpoints besides tensors and plain containers (checked for 0.19.8).
SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` that cannot execute code: weights_only with ``SAFE_GLOBALS`` allowed."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refused to load {path}: it references Python objects that are not plain data "
            f"({_unsafe_reason(err)}); unpickling it could execute code. Checkpoints are read with "
            "weights_only=True (largelm.parallel.deepspeed_compat.SAFE_GLOBALS lists the classes allowed)"
        ) from None


def _unsafe_reason(err: Exception) -> str:
    """The line of torch's message that names the refused global, e.g. 'unsupported GLOBAL posix.system'."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "global" in line.split(" ", 3)[:3]]
    return (named or lines[-1:] or ["unknown"])[0].rstrip(".")


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with the unpickler restricted.

    Saving writes the same files (through ``torch_save_durable``: fsynced, and a full disk is reported as
    ``ENOSPC``), but a failed write (ENOSPC, EFBIG, EIO ...) is *kept* in ``write_error`` and
    later writes of the same save are skipped: raising it inside ``engine.save_checkpoint`` would leave this rank
    out of DeepSpeed's closing barrier while the other ranks wait in it. The checkpoint manager collects the error
    with ``take_write_error`` and fails the save on all ranks together.
    """

    write_error = None

    def makedirs(self, path, exist_ok=False):
        if self.write_error is None:
            try:
                super().makedirs(path, exist_ok=exist_ok)
            except OSError as err:
                self.write_error = err

    def save(self, state_dict, path: str):
        if self.write_error is not None:
            return
        try:
            torch_save_durable(state_dict, path, zipfile=self.zipfile_serialization)
        except Exception as err:  # noqa: BLE001 - kept, raised by the checkpoint manager on every rank
            self.write_error = err if isinstance(err, OSError) else OSError(f"writing {path}: {err}")

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)


def take_write_error(engine):
    """The write error kept by the engine's checkpoint engine during the last save (and reset it), or None."""
    current = getattr(engine, "checkpoint_engine", None)
    error = getattr(current, "write_error", None)
    if current is not None and error is not None:
        current.write_error = None
    return error


def install_safe_checkpoint_engine(engine) -> bool:
    """Make ``engine`` (a DeepSpeedEngine) read checkpoints through ``safe_torch_load``; True if it now does.

    Only DeepSpeed's default torch engine is replaced (class swap, state kept); another configured engine
    (decoupled / fast writer) is left alone (False), and ``forced_weights_only`` still covers its loads. Idempotent:
    ``install_deepspeed_compat`` installs it on every new engine, the checkpoint manager again before each save and
    load (for engines built elsewhere).
    """
    current = getattr(engine, "checkpoint_engine", None)
    if current is not None and type(current) is TorchCheckpointEngine:
        current.__class__ = SafeTorchCheckpointEngine
    return isinstance(current, SafeTorchCheckpointEngine)


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

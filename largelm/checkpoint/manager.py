"""Atomic, self-verifying training checkpoints around DeepSpeed's engine checkpoints.

Layout of ``<dir>``::

    step_00000100/            one complete checkpoint (DeepSpeed files + ours)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt ...   (DeepSpeed)
        trainer_state_rank00000.pt   per-rank: step, data position, RNG states (tensors + plain types only)
        config.yaml                  the config the checkpoint was written with
        manifest.json                sha256 + size of every file above; written last
    latest                       text file naming the newest complete tag (same format DeepSpeed reads)

Why atomic: every rank writes into ``.partial-step_X``; after a barrier rank 0 checksums the files, writes the
manifest, fsyncs, renames the directory to ``step_X`` and only then replaces ``latest`` (``os.replace``). A crash at
any point leaves the previous checkpoint and pointer untouched; a ``.partial-*`` directory is never loaded.
A failed write (disk full, quota, I/O error) on any rank fails the save on every rank together (a flag is
all-reduced where the barriers were, so no rank hangs waiting for another): the partial directory is removed and
``CheckpointError`` names the error and the previous checkpoint. Stale ``.partial-*`` directories of crashed saves
are removed by the next save.

Loading never unpickles code: DeepSpeed's files and ours are read with ``weights_only=True``
(``largelm.parallel.deepspeed_compat``: ``safe_torch_load``, ``forced_weights_only``, the safe checkpoint engine).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from largelm import faults
from largelm.fileio import confined_path, fsync_dir, publish_dir, sha256_file, torch_save_durable, write_text_atomic
from largelm.parallel.deepspeed_compat import (
    UnsafeCheckpointError,
    forced_weights_only,
    install_safe_checkpoint_engine,
    safe_torch_load,
    take_write_error,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL_PREFIX = ".partial-"
REPLACED_PREFIX = ".replaced-"  # a complete checkpoint of the same step being replaced (removed after the swap)
ABANDONED_PREFIX = "abandoned-"  # checkpoints newer than the one a run resumed from, set aside (never resumed)
_TAG_RE = re.compile(r"^step_(\d{8})$")
_LEFTOVER_RE = re.compile(rf"^({re.escape(PARTIAL_PREFIX)}|{re.escape(REPLACED_PREFIX)})step_\d{{8}}$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial, corrupt, or does not match this run."""


@dataclass
class Checkpoint:
    path: Path
    step: int


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _any_rank(failed: bool) -> bool:
    """Collective (in place of a barrier): did any rank fail?"""
    if not dist.is_initialized():
        return failed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def write_manifest(ckpt_dir: Path, meta: dict) -> dict:
    files = {}
    for f in sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[str(f.relative_to(ckpt_dir))] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest = {"format": 1, **meta, "files": files}
    write_text_atomic(ckpt_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_manifest(ckpt_dir: Path) -> dict:
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {MANIFEST}: it is partial or not a largelm checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint manifest {path} is corrupt: {err}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint manifest {path} is corrupt: not an object with a 'files' mapping")
    if not manifest["files"]:  # a save always writes files; an empty map would vouch for nothing
        raise CheckpointError(f"checkpoint manifest {path} lists no files")
    for rel, info in manifest["files"].items():
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            raise CheckpointError(f"checkpoint manifest {path} is corrupt: files[{rel!r}] lacks an integer 'bytes' "
                                  "and a string 'sha256'")
        confined_path(ckpt_dir, rel, f"checkpoint manifest {path}: files[{rel!r}]", CheckpointError)
    return manifest


# Files the loaders read (DeepSpeed finds its .pt files by name pattern): each must be one the manifest vouches for.
_LOADED_SUFFIXES = (".pt", ".yaml", ".json", ".safetensors")


def verify_checkpoint(ckpt_dir: Path, checksums: bool = True) -> dict:
    """Check every file named in the manifest exists with the recorded size (and sha256), and that every file a
    loader may read is named there."""
    manifest = read_manifest(ckpt_dir)
    unlisted = sorted(str(f.relative_to(ckpt_dir)) for f in ckpt_dir.rglob("*")
                      if f.suffix in _LOADED_SUFFIXES and f.name != MANIFEST
                      and str(f.relative_to(ckpt_dir)) not in manifest["files"])
    if unlisted:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {', '.join(unlisted[:5])} not listed in its manifest (added "
                              "after the save; the loader would read unverified files)")
    for rel, info in manifest["files"].items():
        f = ckpt_dir / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {rel} listed in the manifest is missing")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint {ckpt_dir}: file {rel} has {f.stat().st_size} bytes, manifest says {info['bytes']}"
            )
        if checksums and sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt_dir}: file {rel} fails its sha256 check (corrupt)")
    return manifest


def set_aside_newer(root: Path, resumed: Checkpoint) -> Optional[Path]:
    """Resuming from a checkpoint older than the newest (``latest`` pointed back, or the newer ones are damaged):
    move the complete checkpoints of later steps into ``abandoned-<time>/``, so that neither rotation nor a later
    resume ever reaches that other timeline. Returns the directory they went to (None: nothing newer)."""
    newer = [c for c in list_checkpoints(root) if c.step > resumed.step]
    if not newer:
        return None
    aside = Path(root) / f"{ABANDONED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-from-{resumed.path.name}"
    aside.mkdir()
    for c in newer:
        os.rename(c.path, aside / c.path.name)
    fsync_dir(root)
    log.warning("resuming from %s: the later checkpoints %s were moved to %s (not deleted; not resumed)",
                resumed.path.name, [c.path.name for c in newer], aside)
    return aside


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints (those with a manifest), oldest first. Partial directories are ignored."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _TAG_RE.match(child.name)
        if m and child.is_dir() and (child / MANIFEST).is_file():
            found.append(Checkpoint(child, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def find_latest(root: Path, checksums: bool = True) -> Optional[Checkpoint]:
    """The checkpoint ``latest`` points at if it verifies, else the newest complete one that verifies."""
    root = Path(root)
    candidates = list_checkpoints(root)
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        preferred = [c for c in candidates if c.path.name == tag]
        candidates = preferred + [c for c in reversed(candidates) if c.path.name != tag]
        if not preferred and candidates:  # a rollback gone wrong, a deleted directory: never silently
            log.warning("%s names %s, which is not a complete checkpoint in %s; resuming from the newest complete "
                        "one instead (%s)", pointer, tag, root, candidates[0].path.name)
    else:
        candidates = list(reversed(candidates))
    errors = []
    for cand in candidates:
        try:
            verify_checkpoint(cand.path, checksums=checksums)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        for error in errors:  # never silently: say which checkpoints were passed over and why
            log.warning("skipping unusable checkpoint: %s; using %s instead", error, cand.path)
        return cand
    if errors:
        raise CheckpointError(f"no usable checkpoint in {root}:\n  " + "\n  ".join(errors))
    return None


class CheckpointManager:
    """Saves and restores a DeepSpeed engine plus largelm trainer state; rotates old checkpoints."""

    def __init__(self, root: str | Path, keep_last: int = 3, config_yaml: str = "", meta: Optional[dict] = None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.config_yaml = config_yaml
        self.meta = meta or {}

    def save(self, engine, step: int, rank_state: dict) -> Path:
        """Collective: every rank must call it. ``rank_state`` holds this rank's tensors and plain values."""
        tag = tag_for(step)
        partial = self.root / f"{PARTIAL_PREFIX}{tag}"
        final = self.root / tag
        error = None
        if _rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.iterdir():  # left by crashed saves (never loadable); other names: not ours
                    if _LEFTOVER_RE.match(stale.name) and stale.is_dir() and not stale.is_symlink():
                        shutil.rmtree(stale)
            except OSError as err:
                error = err
        self._check_all_ranks(error, step, partial)
        install_safe_checkpoint_engine(engine)  # no-op after install_deepspeed_compat; engines built elsewhere
        # get it here: DeepSpeed's write errors are kept, not raised mid-collective
        engine.save_checkpoint(str(self.root), tag=partial.name, client_state={"step": step}, save_latest=False)
        error = take_write_error(engine)
        if error is None:
            try:
                torch_save_durable(rank_state, partial / f"trainer_state_rank{_rank():05d}.pt")
                faults.in_save(step)  # test hook (tests/faults): inert unless LARGELM_FAULTS is set
            except Exception as err:  # noqa: BLE001 - any write failure fails the save collectively
                error = err
        self._check_all_ranks(error, step, partial)
        if _rank() == 0:
            replaced = self.root / f"{REPLACED_PREFIX}{tag}"
            try:
                write_text_atomic(partial / "config.yaml", self.config_yaml)  # fsynced before the manifest vouches
                write_manifest(partial, {"step": step, "tag": tag, **self.meta})
                publish_dir(partial, final, replaced)  # a same-step checkpoint is swapped out only now
                write_text_atomic(self.root / LATEST, tag)
                self._rotate(step)
            except OSError as err:
                error = err
        self._check_all_ranks(error, step, partial)
        return final

    def _check_all_ranks(self, error: Optional[BaseException], step: int, partial: Path) -> None:
        """Collective: if any rank failed, remove the partial directory and raise on every rank."""
        if not _any_rank(error is not None):
            return
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)  # frees the space a full disk needs back
        pointer = self.root / LATEST
        previous = pointer.read_text().strip() if pointer.is_file() else None
        kept = (f"the previous checkpoint {self.root / previous} and the '{LATEST}' pointer are unchanged"
                if previous else "no earlier checkpoint exists")
        cause = f"rank {_rank()}: {error}" if error is not None else "failed on another rank (see its error)"
        raise CheckpointError(f"saving the checkpoint of step {step} to {self.root} failed ({cause}); {kept}")

    def _rotate(self, saved_step: int) -> None:
        """Keep the checkpoint just saved and the ``keep_last - 1`` newest before it. Checkpoints of later steps
        (another timeline: ``set_aside_newer`` moves them away on resume) are never deleted here, only named."""
        complete = list_checkpoints(self.root)
        older = [c for c in complete if c.step < saved_step]
        newer = [c.path.name for c in complete if c.step > saved_step]
        if newer:
            log.warning("%s holds checkpoints of later steps than the one just saved (step %d): %s; kept, not "
                        "rotated (move them aside if that timeline is abandoned)", self.root, saved_step, newer)
        for old in older[: max(0, len(older) - (self.keep_last - 1))]:
            shutil.rmtree(old.path, ignore_errors=True)

    def load(self, engine, checkpoint: Checkpoint) -> dict:
        """Collective: restore engine (model, optimizer, scheduler) and return this rank's trainer state.

        Nothing is unpickled beyond tensors and plain data (``deepspeed_compat.safe_torch_load``): a crafted file is
        refused with ``CheckpointError`` before any of its code runs.
        """
        import pickle

        install_safe_checkpoint_engine(engine)
        try:
            with forced_weights_only():
                load_path, _ = engine.load_checkpoint(
                    str(self.root), tag=checkpoint.path.name, load_optimizer_states=True,
                    load_lr_scheduler_states=True,
                )
        except UnsafeCheckpointError as err:
            raise CheckpointError(f"checkpoint {checkpoint.path}: {err}") from None
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"checkpoint {checkpoint.path}: refused to unpickle a file (weights_only): "
                                  f"{str(err).splitlines()[0]}") from None
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {checkpoint.path}")
        from largelm.parallel.deepspeed_compat.moe import restore_expert_weights  # lazy (preflight: no megatron)

        restore_expert_weights(engine)  # MoE: each expert-parallel rank's own experts, from its ZeRO partitions
        state_file = checkpoint.path / f"trainer_state_rank{_rank():05d}.pt"
        if not state_file.is_file():
            raise CheckpointError(
                f"checkpoint {checkpoint.path} has no {state_file.name}: it was written by a run with fewer ranks"
            )
        try:
            return safe_torch_load(state_file)
        except UnsafeCheckpointError as err:
            raise CheckpointError(f"checkpoint {checkpoint.path}: {err}") from None

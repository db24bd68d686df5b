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
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from largelm.fileio import fsync_dir, sha256_file, write_text_atomic

MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL_PREFIX = ".partial-"
_TAG_RE = re.compile(r"^step_(\d{8})$")


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


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint manifest {path} is corrupt: {err}") from None


def verify_checkpoint(ckpt_dir: Path, checksums: bool = True) -> dict:
    """Check every file named in the manifest exists with the recorded size (and sha256)."""
    manifest = read_manifest(ckpt_dir)
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
    else:
        candidates = list(reversed(candidates))
    errors = []
    for cand in candidates:
        try:
            verify_checkpoint(cand.path, checksums=checksums)
            return cand
        except CheckpointError as err:
            errors.append(str(err))
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
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():  # left by a crash during an earlier save of this step
                shutil.rmtree(partial)
        _barrier()
        engine.save_checkpoint(str(self.root), tag=partial.name, client_state={"step": step}, save_latest=False)
        torch.save(rank_state, partial / f"trainer_state_rank{_rank():05d}.pt")
        _barrier()
        if _rank() == 0:
            (partial / "config.yaml").write_text(self.config_yaml)
            write_manifest(partial, {"step": step, "tag": tag, **self.meta})
            fsync_dir(partial)
            if final.exists():  # a complete checkpoint of the same step: replace it only after ours is complete
                shutil.rmtree(final)
            os.rename(partial, final)
            fsync_dir(self.root)
            write_text_atomic(self.root / LATEST, tag)
            self._rotate()
        _barrier()
        return final

    def _rotate(self) -> None:
        for old in list_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(old.path, ignore_errors=True)

    def load(self, engine, checkpoint: Checkpoint) -> dict:
        """Collective: restore engine (model, optimizer, scheduler) and return this rank's trainer state."""
        load_path, _ = engine.load_checkpoint(
            str(self.root), tag=checkpoint.path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {checkpoint.path}")
        state_file = checkpoint.path / f"trainer_state_rank{_rank():05d}.pt"
        if not state_file.is_file():
            raise CheckpointError(
                f"checkpoint {checkpoint.path} has no {state_file.name}: it was written by a run with fewer ranks"
            )
        return torch.load(state_file, map_location="cpu", weights_only=True)

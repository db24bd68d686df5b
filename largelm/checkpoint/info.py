"""Which checkpoint a path names and how it was written (layout, ZeRO stage, world size), and the DeepSpeed files
each model-parallel rank's weights are in: what the reader (reader.py) and the converter's ``info`` need, without
reading any tensor."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from largelm.checkpoint.manager import LATEST, MANIFEST, PARTIAL_PREFIX, CheckpointError, verify_checkpoint
from largelm.config import Config, ConfigError, checkpoint_config_from_dict
from largelm.errors import ConversionError
from largelm.parallel.deepspeed_config import engine_zero_stage


# --- locating ------------------------------------------------------------------------------------------------
@dataclass
class CheckpointInfo:
    """One complete largelm training checkpoint and the layout that wrote it."""

    path: Path  # the step directory
    step: int
    config: Config
    manifest: dict
    tensor_parallel: int
    pipeline_parallel: int
    zero_stage: int
    world_size: int

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.model_parallel

    def describe(self) -> str:
        return (f"{self.path} (step {self.step}, TP={self.tensor_parallel} PP={self.pipeline_parallel} "
                f"DP={self.data_parallel} ZeRO-{self.zero_stage}, {self.config.train.precision})")


def locate_checkpoint(path: Path, tag: Optional[str] = None) -> Path:
    """The step directory meant by ``path``: a step directory itself, or a checkpoint root (``latest`` or ``tag``)."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"checkpoint {path} does not exist")
    if path.name.startswith(PARTIAL_PREFIX):
        raise ConversionError(f"{path} is a partial checkpoint (its save was interrupted); use a complete step_* "
                              "directory")
    if tag is not None:
        step_dir = path / tag
        if not step_dir.is_dir():
            raise ConversionError(f"checkpoint root {path} has no {tag}")
        return step_dir
    if (path / MANIFEST).is_file():
        return path
    if (path / LATEST).is_file():
        tag = (path / LATEST).read_text().strip()
        step_dir = path / tag
        if not step_dir.is_dir():
            raise ConversionError(f"{path}/{LATEST} names {tag!r}, which does not exist")
        return step_dir
    if path.is_dir() and any(child.name.endswith("_model_states.pt") for child in path.iterdir()):
        raise ConversionError(f"checkpoint {path} has no {MANIFEST}: it is partial (the save did not finish) or not "
                              "written by largelm")
    raise ConversionError(f"{path} is not a largelm checkpoint (no {MANIFEST} and no {LATEST} pointer)")


def inspect_checkpoint(path: Path, tag: Optional[str] = None, checksums: bool = True) -> CheckpointInfo:
    """Locate, verify (manifest sizes and sha256) and describe a checkpoint; fails on anything missing."""
    step_dir = locate_checkpoint(path, tag)
    try:
        manifest = verify_checkpoint(step_dir, checksums=checksums)
    except CheckpointError as err:
        raise ConversionError(str(err)) from None
    cfg_path = step_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConversionError(f"checkpoint {step_dir} has no config.yaml")
    try:
        cfg = checkpoint_config_from_dict(yaml.safe_load(cfg_path.read_text()), source=str(cfg_path))
    except (ConfigError, yaml.YAMLError) as err:
        raise ConversionError(f"checkpoint config {cfg_path} is invalid: {err}") from None
    if cfg.model.vocab_size is None:
        raise ConversionError(f"{cfg_path}: model.vocab_size is not recorded")
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    world = manifest.get("world_size")
    if world is None:
        raise ConversionError(f"{step_dir}/{MANIFEST} does not record world_size")
    for key, value in (("tensor_parallel", tp), ("pipeline_parallel", pp), ("zero_stage", cfg.parallel.zero_stage)):
        if key in manifest and manifest[key] != value:
            raise ConversionError(f"{step_dir}: manifest says {key}={manifest[key]} but config.yaml says {value}")
    if world % (tp * pp):
        raise ConversionError(f"{step_dir}: world size {world} is not divisible by TP x PP = {tp * pp}")
    # The stage DeepSpeed ran (and wrote files for): the configured one unless a single replica ran a cheaper one.
    info = CheckpointInfo(step_dir, int(manifest.get("step", -1)), cfg, manifest, tp, pp,
                          engine_zero_stage(cfg, world), world)
    _check_files_present(info)
    return info


def model_state_files(info: CheckpointInfo, mp_rank: int) -> list[Path]:
    if info.zero_stage == 3:
        return [info.path / f"zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_model_states.pt"
                for d in range(info.data_parallel)]
    return [info.path / f"mp_rank_{mp_rank:02d}_model_states.pt"]


def optim_state_files(info: CheckpointInfo, mp_rank: int) -> list[Path]:
    """ZeRO partitions of this model-parallel rank in data-parallel order ([] for ZeRO-0 without them).

    DeepSpeed prefixes them ``bf16_`` when bf16 is enabled (and may have written the other spelling before).
    """
    prefixes = ("bf16_", "") if info.config.train.precision == "bf16" else ("", "bf16_")
    for prefix in prefixes:
        files = [info.path / f"{prefix}zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_optim_states.pt"
                 for d in range(info.data_parallel)]
        if any(f.is_file() for f in files):
            return files
    if info.zero_stage == 0:
        return []
    return [info.path / f"{prefixes[0]}zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_optim_states.pt"
            for d in range(info.data_parallel)]


def _check_files_present(info: CheckpointInfo) -> None:
    missing = []
    for m in range(info.model_parallel):
        missing += [f.name for f in model_state_files(info, m) + optim_state_files(info, m) if not f.is_file()]
    if missing:
        raise ConversionError(
            f"checkpoint {info.path} is incomplete for its layout (TP={info.tensor_parallel} PP="
            f"{info.pipeline_parallel} DP={info.data_parallel} ZeRO-{info.zero_stage}): missing {missing[:8]}"
            + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        )


def checkpoint_summary(info: CheckpointInfo) -> dict:
    return json.loads(json.dumps({"path": str(info.path), "step": info.step, "tensor_parallel": info.tensor_parallel,
                                  "pipeline_parallel": info.pipeline_parallel, "data_parallel": info.data_parallel,
                                  "zero_stage": info.zero_stage, "world_size": info.world_size,
                                  "precision": info.config.train.precision,
                                  "model": info.config.model.model_dump(mode="json")}))

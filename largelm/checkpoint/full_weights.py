"""Full (TP=1, PP=1) GPTModel weights + config from a training checkpoint, for tools that run the model outside
training (quantization, distillation teachers, generation).

``load_full_weights`` is the one entry point; it consolidates the DeepSpeed ZeRO checkpoint with DeepSpeed's own
``zero_to_fp32`` (stages 0-3, fp32 master weights). It accepts only checkpoints written at tensor_parallel=1 and
pipeline_parallel=1: other layouts need the checkpoint converter (largelm/checkpoint/convert), which this function
is meant to be swapped for once it lands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import yaml

from largelm.checkpoint.manager import CheckpointError, find_latest, read_manifest
from largelm.config import Config, config_from_dict


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``step_XXXXXXXX`` directory from either itself or a checkpoint root (its verified latest)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    latest = find_latest(path, checksums=False)
    if latest is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (no step_XXXXXXXX/manifest.json)")
    return latest.path


def checkpoint_config(ckpt_dir: Path) -> Config:
    cfg_file = ckpt_dir / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} has no config.yaml")
    return config_from_dict(yaml.safe_load(cfg_file.read_text()), source=str(cfg_file))


def load_full_weights(path: str | Path, dtype: Optional[torch.dtype] = torch.float32) -> tuple[Config, dict, Path]:
    """``(config, state_dict, step_dir)``: GPTModel parameter names -> full tensors (``dtype``; None keeps fp32)."""
    ckpt_dir = resolve_checkpoint(path)
    cfg = checkpoint_config(ckpt_dir)
    manifest = read_manifest(ckpt_dir)
    tp = manifest.get("tensor_parallel", cfg.parallel.tensor_parallel)
    pp = manifest.get("pipeline_parallel", cfg.parallel.pipeline_parallel)
    if tp != 1 or pp != 1:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} was written with tensor_parallel={tp}, pipeline_parallel={pp}; only TP=1/PP=1 "
            "checkpoints are consolidated here (convert it to TP=1 first with the checkpoint converter)"
        )
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
    except Exception as err:  # DeepSpeed raises bare ValueError/FileNotFoundError with little context
        raise CheckpointError(f"could not consolidate DeepSpeed checkpoint {ckpt_dir}: {err}") from err
    state = {k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return cfg, state, ckpt_dir

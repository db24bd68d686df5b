"""Full (TP=1, PP=1) GPTModel weights + config from a training checkpoint, for tools that run the model outside
training (quantization, distillation teachers, generation).

``load_full_weights`` is the one entry point; it consolidates the checkpoint with the checkpoint converter
(largelm/checkpoint/reader.py: any TP/PP size, ZeRO stage and DP size, DeepSpeed's BF16_Optimizer, the fp32
master weights wherever they exist) into the full tensors of one TP=1/PP=1 model, and returns the checkpoint's
config with that layout (``parallel``: TP=1, PP=1, no sequence parallelism), the one the tools build.
``load_tp_shard_weights`` is the sharded reader's counterpart: one TP rank's shard for any TP, read from the
checkpoint's TP ranks that hold a part of it only (distillation teachers at the run's TP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from largelm.checkpoint.info import inspect_checkpoint
from largelm.checkpoint.manager import CheckpointError, find_latest
from largelm.checkpoint.reader import consolidate_checkpoint
from largelm.checkpoint.tp_slice import read_tp_slice
from largelm.config import Config, checkpoint_config_from_dict
from largelm.errors import ConversionError
from largelm.fileio import YAMLError, read_yaml


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
    try:
        return checkpoint_config_from_dict(read_yaml(cfg_file), source=str(cfg_file))
    except YAMLError as err:
        raise CheckpointError(f"checkpoint config {err}") from None


def load_full_weights(path: str | Path, dtype: Optional[torch.dtype] = torch.float32) -> tuple[Config, dict, Path]:
    """``(config, state_dict, step_dir)``: GPTModel parameter names -> full tensors (``dtype``; None keeps fp32)."""
    ckpt_dir = resolve_checkpoint(path)

    try:  # the checkpoint converter reads config.yaml and the manifest once and checks they agree
        info = inspect_checkpoint(ckpt_dir, checksums=False)
    except ConversionError as err:
        raise CheckpointError(f"could not consolidate DeepSpeed checkpoint {ckpt_dir}: {err}") from err
    # the tools build one TP=1/PP=1 model of the checkpoint's shape; its padded vocabulary is TP=1's
    cfg = info.config.model_copy(update={"parallel": info.config.parallel.model_copy(
        update={"tensor_parallel": 1, "pipeline_parallel": 1, "sequence_parallel": False, "virtual_pipeline": None})})
    try:  # any layout: the TP shards joined, the pipeline stages merged, fp32 master weights where they exist
        consolidated = consolidate_checkpoint(info, log=lambda _: None)
    except ConversionError as err:
        raise CheckpointError(f"could not consolidate DeepSpeed checkpoint {ckpt_dir}: {err}") from err
    state = _cast(consolidated.padded_tensors(cfg.model.padded_vocab_size()), dtype)
    return cfg, state, ckpt_dir


def load_tp_shard_weights(path: str | Path, tp_rank: int, tp: int, padded_vocab: int,
                          dtype: Optional[torch.dtype] = torch.float32,
                          keep: Optional[Callable[[str], bool]] = None) -> tuple[Config, dict, Path, list[int]]:
    """``(config, shard, step_dir, source TP ranks read)``: TP rank ``tp_rank`` of ``tp``'s part of the checkpoint's
    weights (GPTModel names; fp32 masters merged over ZeRO partitions and pipeline stages; the vocabulary tensors
    cut from ``padded_vocab`` rows), whatever TP the checkpoint was trained at, read from the checkpoint's TP ranks
    that hold a part of it only (largelm/checkpoint/tp_slice.py). The config's ``parallel`` is TP=``tp``, PP=1,
    without sequence parallelism. ``keep``: only the weights whose names it accepts (``read_tp_slice``)."""
    ckpt_dir = resolve_checkpoint(path)
    try:
        info = inspect_checkpoint(ckpt_dir, checksums=False)
        shard, sources = read_tp_slice(info, tp_rank, tp, padded_vocab, log=lambda _: None, keep=keep)
    except ConversionError as err:
        raise CheckpointError(f"could not read TP rank {tp_rank} of {tp} from DeepSpeed checkpoint {ckpt_dir}: "
                              f"{err}") from err
    cfg = info.config.model_copy(update={"parallel": info.config.parallel.model_copy(
        update={"tensor_parallel": tp, "pipeline_parallel": 1, "sequence_parallel": False, "virtual_pipeline": None})})
    return cfg, _cast(shard, dtype), ckpt_dir, sources


def _cast(state: dict, dtype: Optional[torch.dtype]) -> dict:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

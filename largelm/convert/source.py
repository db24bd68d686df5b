"""Open anything the converters accept and treat it uniformly: a training checkpoint (root or step directory),
a consolidated directory, or a Hugging Face model directory.

``Source.consolidated()`` gives the hub form; ``Source.logits(tokens)`` runs the source *as it is* (its own
layout / its own library) for verification; ``Source.weight_dtype`` picks the tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from largelm.checkpoint.consolidated import META, Consolidated, is_consolidated, load_consolidated
from largelm.checkpoint.info import inspect_checkpoint
from largelm.checkpoint.manager import LATEST, MANIFEST
from largelm.checkpoint.reader import consolidate_checkpoint
from largelm.config import Config
from largelm.convert import verify
from largelm.convert.hf import hf_logits, import_hf
from largelm.errors import ConversionError


@dataclass
class Source:
    kind: str  # "checkpoint" | "consolidated" | "hf"
    path: Path
    info: object = None  # CheckpointInfo for checkpoints
    base_config: Optional[Config] = None  # for Hugging Face imports: the training config to complete
    log: object = print
    _consolidated: Optional[Consolidated] = field(default=None, repr=False)

    def describe(self) -> str:
        if self.kind == "checkpoint":
            return "checkpoint " + self.info.describe()
        return f"{'consolidated model' if self.kind == 'consolidated' else 'Hugging Face model'} {self.path}"

    @property
    def short(self) -> str:
        if self.kind == "checkpoint":
            i = self.info
            return (f"checkpoint (TP={i.tensor_parallel} PP={i.pipeline_parallel} DP={i.data_parallel} "
                    f"ZeRO-{i.zero_stage})")
        return {"consolidated": "consolidated", "hf": "Hugging Face"}[self.kind]

    @property
    def has_optimizer_state(self) -> bool:
        return self.kind == "checkpoint"

    def consolidated(self) -> Consolidated:
        if self._consolidated is None:
            if self.kind == "checkpoint":
                self._consolidated = consolidate_checkpoint(self.info, log=self.log)
            elif self.kind == "consolidated":
                self._consolidated = load_consolidated(self.path)
            else:

                self._consolidated = import_hf(self.path, base_config=self.base_config, log=self.log)
        return self._consolidated

    @property
    def weight_dtype(self) -> torch.dtype:
        if self.kind == "checkpoint":
            return torch.float32  # ZeRO fp32 masters (or module weights read as fp32)
        return self.consolidated().dtype

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.kind == "checkpoint":
            return verify.checkpoint_logits(self.info, tokens)
        if self.kind == "consolidated":
            return verify.consolidated_logits(self.consolidated(), tokens)

        return hf_logits(self.path, tokens)


def open_source(path, tag: Optional[str] = None, checksums: bool = True, base_config: Optional[Config] = None,
                log=print) -> Source:
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path} does not exist")
    if is_consolidated(path):
        return Source("consolidated", path, log=log)
    if (path / "config.json").is_file() and not (path / MANIFEST).is_file():
        return Source("hf", path, base_config=base_config, log=log)
    if tag or (path / MANIFEST).is_file() or (path / LATEST).is_file() or path.name.startswith((".partial-", "step_")) \
            or (path.is_dir() and any(c.name.endswith("_model_states.pt") for c in path.iterdir())):
        return Source("checkpoint", path, info=inspect_checkpoint(path, tag, checksums=checksums), log=log)
    raise ConversionError(f"{path} is neither a largelm checkpoint (manifest.json / latest), a consolidated model "
                          f"({META}) nor a Hugging Face model directory (config.json)")

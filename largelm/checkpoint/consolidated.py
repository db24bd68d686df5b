"""The consolidated format: the hub every conversion goes through.

A consolidated directory holds one model, independent of any parallel layout::

    model.safetensors   full (TP=1, single-stage) GPTModel or BertModel tensors under megatron's names, the vocabulary
                        tensors cut to model.vocab_size rows (no TP padding); plus, when the source had them,
                        the padding rows under "vocab_padding/<name>" (see below)
    largelm.json        {"format": "largelm-consolidated", "format_version": 1, "model": <ModelConfig>,
                         "config": <whole largelm Config or null>, "dtype", "step", "source", "tokenizer",
                         "verification", "bert": <BertConfig> for model.arch bert}
    tokenizer.model     the sentencepiece model (when known), so the directory is self-contained

Vocabulary padding: megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by x TP``; the
padded rows are ordinary (trained-down) logits. The consolidated tensors hold only the real vocabulary (what
Hugging Face export and evaluation want); the trained padding rows are kept beside them, so resharding to a
layout with the same padded size reproduces the source's loss exactly. A layout needing more padding rows gets
zero rows (their logits are 0; the logits of real tokens never depend on them), fewer are cut.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from largelm.config import BertConfig, Config, ConfigError, ModelConfig, config_from_dict
from largelm.errors import ConversionError
from largelm.fileio import confined_path, fsync_file, save_safetensors, sha256_file, write_text_atomic
from largelm.model.layout import VOCAB_PARALLEL, param_shapes

FORMAT = "largelm-consolidated"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "largelm.json"
TOKENIZER = "tokenizer.model"
PADDING_PREFIX = "vocab_padding/"

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ConversionError(f"dtype {name!r} is not one of {sorted(DTYPES)}") from None


@dataclass
class Consolidated:
    """A whole model in the hub layout (see the module docstring)."""

    tensors: dict[str, torch.Tensor]  # GPTModel names, TP=1, vocabulary cut to model.vocab_size
    model: ModelConfig  # vocab_size set
    config: Optional[Config] = None  # the whole training config, when the source had one
    padding: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> trained padding rows
    step: Optional[int] = None
    source: dict = field(default_factory=dict)
    tokenizer: Optional[Path] = None  # sentencepiece model file
    verification: list = field(default_factory=list)
    bert: Optional[BertConfig] = None  # model.arch bert: binary head / norm placement (default: config.bert)

    def __post_init__(self) -> None:
        if self.model.arch == "bert" and self.bert is None:
            self.bert = self.config.bert if self.config is not None and self.config.bert else BertConfig()

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    def validate(self) -> None:
        """Every expected tensor present with its full shape, nothing else (ConversionError otherwise)."""
        expected = param_shapes(self.model, self.bert)
        missing = [n for n in expected if n not in self.tensors]
        unexpected = [n for n in self.tensors if n not in expected]
        wrong = [f"{n}: {tuple(t.shape)} (expected {expected[n]})" for n, t in self.tensors.items()
                 if n in expected and tuple(t.shape) != expected[n]]
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing {_abbrev(missing)}")
            if unexpected:
                parts.append(f"unexpected {_abbrev(unexpected)}")
            if wrong:
                parts.append(f"wrong shapes {_abbrev(wrong)}")
            raise ConversionError("weights do not match the model config: " + "; ".join(parts))
        for name, pad in self.padding.items():
            if name not in VOCAB_PARALLEL or pad.shape[1:] != self.tensors[name].shape[1:]:
                raise ConversionError(f"bad vocabulary padding record {name} {tuple(pad.shape)}")

    def cast(self, dtype: torch.dtype) -> "Consolidated":
        def conv(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        return Consolidated({k: conv(v) for k, v in self.tensors.items()}, self.model, self.config,
                            {k: conv(v) for k, v in self.padding.items()}, self.step, dict(self.source),
                            self.tokenizer, list(self.verification), self.bert)

    def padded_tensors(self, padded_vocab: int) -> dict[str, torch.Tensor]:
        """The tensors with the vocabulary tensors padded (or cut) to ``padded_vocab`` rows, for loading into a
        GPTModel whose padded vocabulary is ``padded_vocab`` (``model.padded_vocab_size(tp)``)."""
        vocab = self.model.vocab_size
        if padded_vocab < vocab:
            raise ConversionError(f"padded vocabulary {padded_vocab} is smaller than vocab_size {vocab}")
        out = dict(self.tensors)
        for name in VOCAB_PARALLEL:
            if name not in out:
                continue
            real = out[name]
            extra = padded_vocab - vocab
            recorded = self.padding.get(name, real.new_zeros((0, *real.shape[1:])))[:extra]
            zeros = real.new_zeros((extra - recorded.shape[0], *real.shape[1:]))
            out[name] = torch.cat([real, recorded.to(real.dtype), zeros]) if extra else real
        return out


def _abbrev(items: list, limit: int = 6) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)})"


def strip_vocab_padding(tensors: dict[str, torch.Tensor], vocab_size: int) -> tuple[dict, dict]:
    """Split padded vocabulary tensors into (real rows, padding rows)."""
    out, padding = dict(tensors), {}
    for name in VOCAB_PARALLEL:
        if name in out:
            full = out[name]
            if full.shape[0] < vocab_size:
                raise ConversionError(f"{name} has {full.shape[0]} rows, fewer than vocab_size={vocab_size}")
            out[name] = full[:vocab_size].contiguous()
            if full.shape[0] > vocab_size:
                padding[name] = full[vocab_size:].contiguous()
    return out, padding


def is_consolidated(path: Path) -> bool:
    return (Path(path) / META).is_file()


def save_consolidated(out_dir: Path, c: Consolidated) -> Path:
    """Write ``c`` to ``out_dir`` (created; existing hub files are replaced). Returns ``out_dir``."""
    c.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # META vouches for the directory (is_consolidated): an old one goes first and the new one is written last and
    # atomically, so a crash mid-save never leaves old metadata describing new weights.
    (out_dir / META).unlink(missing_ok=True)
    tensors = {k: v.contiguous() for k, v in c.tensors.items()}
    tensors.update({PADDING_PREFIX + k: v.contiguous() for k, v in c.padding.items()})
    tmp = out_dir / (WEIGHTS + ".tmp")
    save_safetensors(tensors, tmp, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    fsync_file(tmp)  # durable before META vouches for it (a power cut must not leave META over a torn file)
    tmp.replace(out_dir / WEIGHTS)
    tokenizer = None
    if c.tokenizer is not None:
        src = Path(c.tokenizer)
        if not src.is_file():
            raise ConversionError(f"tokenizer model {src} does not exist")
        dst = out_dir / TOKENIZER
        if src.resolve() != dst.resolve():
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.copyfile(src, tmp)
            fsync_file(tmp)
            tmp.replace(dst)
        tokenizer = {"file": TOKENIZER, "sha256": sha256_file(dst)}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": c.model.model_dump(mode="json"),
        "config": c.config.model_dump(mode="json") if c.config is not None else None,
        "dtype": dtype_name(c.dtype),
        "vocab_padding_rows": {k: int(v.shape[0]) for k, v in c.padding.items()},
        "step": c.step,
        "source": c.source,
        "tokenizer": tokenizer,
        "verification": c.verification,
        "bert": c.bert.model_dump(mode="json") if c.bert is not None else None,
        "tensors": {k: list(v.shape) for k, v in c.tensors.items()},
    }
    write_text_atomic(out_dir / META, json.dumps(meta, indent=1) + "\n")
    return out_dir


def load_consolidated(path: Path) -> Consolidated:
    """Read a consolidated directory (safetensors only: nothing is unpickled)."""
    from safetensors import safe_open

    path = Path(path)
    meta_path, weights = path / META, path / WEIGHTS
    if not meta_path.is_file():
        raise ConversionError(f"{path} is not a consolidated largelm model (no {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{meta_path} is not valid JSON: {err}") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ConversionError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('format_version')!r}, "
                              f"expected {FORMAT!r} v{FORMAT_VERSION}")
    if not weights.is_file():
        raise ConversionError(f"consolidated model {path} is incomplete: {WEIGHTS} is missing")
    failed = [v for v in meta.get("verification") or [] if not v.get("ok", True)]
    if failed:
        raise ConversionError(f"consolidated model {path} failed its verification ({failed[0].get('what')}: max |logit "
                              f"diff| {failed[0].get('max_abs_diff')}); it must not be used")
    try:
        model = ModelConfig.model_validate(meta["model"])
        config = config_from_dict(meta["config"], source=str(meta_path)) if meta.get("config") else None
        bert = BertConfig.model_validate(meta["bert"]) if meta.get("bert") else None
    except (ConfigError, ValueError) as err:
        raise ConversionError(f"{meta_path}: invalid model config: {err}") from None
    tensors, padding = {}, {}
    try:
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():
                if key.startswith(PADDING_PREFIX):
                    padding[key[len(PADDING_PREFIX):]] = fh.get_tensor(key)
                else:
                    tensors[key] = fh.get_tensor(key)
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise ConversionError(f"{weights} cannot be read (truncated or corrupt?): {err}") from None
    tok = meta.get("tokenizer")
    tokenizer = None
    if tok:  # largelm.json may come with a download: its file name stays inside the directory, its hash is checked
        where = f"{meta_path}: tokenizer.file"
        tokenizer = confined_path(path, tok.get("file") if isinstance(tok, dict) else None, where, ConversionError)
        if not tokenizer.is_file():
            raise ConversionError(f"consolidated model {path}: tokenizer file {tok['file']} is missing")
        if sha256_file(tokenizer) != tok.get("sha256"):
            raise ConversionError(f"consolidated model {path}: tokenizer file {tok['file']} does not match the sha256 "
                                  f"{meta_path} records ({str(tok.get('sha256'))[:12]}...): replaced or damaged")
    c = Consolidated(tensors, model, config, padding, meta.get("step"), meta.get("source") or {}, tokenizer,
                     meta.get("verification") or [], bert)
    c.validate()
    return c

"""On-disk format of tokenized shards: the manifest schema and the per-sample encoding.

A prepared split is a directory::

    <split>/manifest.json
    <split>/<split>-000000.tar
    <split>/<split>-000001.tar ...

Each tar is a webdataset shard. One sample is one tar member ``<key>.tokens.npy``: a 1-D ``.npy`` array of
exactly ``seq_length + 1`` token ids (``inputs = tokens[:-1]``, ``labels = tokens[1:]``). The dtype is
``uint16`` when every id fits (``vocab_size <= 65536``), else ``uint32``. ``.npy`` (rather than raw bytes) is
self-describing, so a reader can reject a sample of the wrong dtype or length without trusting the manifest.
Keys are ``s<10-digit index>``: unique within a split and free of dots (webdataset splits a member name at its
first dot into key and extension).

Manifest ``kind`` says what a sample holds. ``tokens`` (the default, GPT): packed token stream as above.
``bert_pairs`` (``largelm.prepare.bert_data``): the same member and length, laid out as
``[CLS] A [SEP] B [SEP] <pad>...`` in the first ``seq_length`` ids (pad id 0) and the pair label (0 = B is the
true continuation in order, 1 = swapped (SOP) / random (NSP), see ``pair_objective``) as the last id. Segment ids
and the padding mask follow from the two [SEP]s; masking is done at load time (``largelm.data.bert_masking``).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT_NAME = "largelm-tokens"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENS_FIELD = "tokens.npy"


class DataError(ValueError):
    """Bad data on disk or bad input text; the message names the file/shard/sample and what is wrong."""


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def sample_key(index: int) -> str:
    return f"s{index:010d}"


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="file name inside the split directory")
    num_samples: int = Field(gt=0)
    num_tokens: int = Field(gt=0)
    num_bytes: int = Field(gt=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["largelm-tokens"] = FORMAT_NAME
    format_version: Literal[1] = FORMAT_VERSION
    split: str
    seq_length: int = Field(gt=0)
    sample_length: int = Field(gt=1, description="tokens stored per sample = seq_length + 1")
    dtype: Literal["uint16", "uint32"]
    vocab_size: int = Field(gt=0)
    eos_id: int = Field(ge=0)
    tokenizer_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    shards: list[ShardInfo] = Field(min_length=1)
    num_samples: int = Field(gt=0)
    num_tokens: int = Field(gt=0, description="tokens stored in samples = num_samples * sample_length")
    num_documents: int = Field(ge=0)
    empty_documents: int = Field(ge=0, description="input documents with no text (not written)")
    dropped_tokens: int = Field(ge=0, description="tokens not written: tail tokens that did not fill a whole sample; "
                                "bert_pairs: literal special tokens, truncation of over-long pairs, unpairable rest")
    inputs: list[str] = Field(default_factory=list)
    kind: Literal["tokens", "bert_pairs"] = "tokens"
    pair_objective: Optional[Literal["sop", "nsp"]] = Field(default=None, description="bert_pairs only")

    @model_validator(mode="after")
    def _check_totals(self) -> "Manifest":
        if (self.kind == "bert_pairs") != (self.pair_objective is not None):
            raise ValueError("pair_objective is required for kind 'bert_pairs' and only allowed there")
        if self.sample_length != self.seq_length + 1:
            raise ValueError(f"sample_length={self.sample_length} must be seq_length + 1 = {self.seq_length + 1}")
        if self.dtype != token_dtype(self.vocab_size):
            raise ValueError(f"dtype={self.dtype} does not match vocab_size={self.vocab_size}")
        if sum(s.num_samples for s in self.shards) != self.num_samples:
            raise ValueError(f"num_samples={self.num_samples} is not the sum of the shards' num_samples")
        for s in self.shards:
            if s.num_tokens != s.num_samples * self.sample_length:
                raise ValueError(f"shard {s.file}: num_tokens={s.num_tokens} != num_samples x sample_length")
        if self.num_tokens != self.num_samples * self.sample_length:
            raise ValueError(f"num_tokens={self.num_tokens} != num_samples x sample_length")
        if len({s.file for s in self.shards}) != len(self.shards):
            raise ValueError("a shard file is listed twice")
        return self

    def fingerprint(self) -> str:
        """Content address of the dataset: changes whenever any shard's bytes or the layout change."""
        data = self.model_dump(mode="json")
        if data["kind"] == "tokens":  # fields added later: absent from GPT manifests' fingerprints (resume stays valid)
            del data["kind"], data["pair_objective"]
        canonical = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()


def read_manifest(split_dir: str | Path) -> Manifest:
    path = Path(split_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no manifest (is {split_dir} a directory written by largelm-prepare-data?)")
    return parse_manifest(path.read_text(), path)


def parse_manifest(text: str | bytes, where) -> Manifest:
    """A manifest's JSON text checked against the schema; errors name ``where`` (its file or URL)."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{where}: not valid JSON: {err}") from None
    try:
        return Manifest.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors())
        raise DataError(f"{where}: invalid manifest: {problems}") from None


def write_manifest(split_dir: Path, manifest: Manifest) -> Path:
    path = split_dir / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=1) + "\n")
    tmp.replace(path)  # atomic: a crashed writer never leaves a half manifest that looks complete
    return path


def encode_tokens(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(tokens), allow_pickle=False)
    return buf.getvalue()


def decode_sample(files: dict, manifest: Manifest, where: str) -> np.ndarray:
    """Check one webdataset sample dict against the manifest and return its token array.

    ``where`` names the shard and key for the error message. Raises DataError for anything unexpected.
    """
    payload = files.get(TOKENS_FIELD)
    if payload is None:
        found = sorted(k for k in files if not k.startswith("__"))
        raise DataError(f"{where}: no {TOKENS_FIELD} member (found {found})")
    buffer = io.BytesIO(payload)
    try:
        tokens = np.load(buffer, allow_pickle=False)
    except Exception as err:  # numpy raises ValueError/EOFError/etc. for a damaged header
        raise DataError(f"{where}: {TOKENS_FIELD} is not a readable .npy array: {err}") from None
    if buffer.tell() != len(payload):  # np.load stops after the array; bytes after it were not written by us
        raise DataError(f"{where}: {TOKENS_FIELD} has {len(payload) - buffer.tell()} bytes after its array")
    if tokens.dtype != np.dtype(manifest.dtype) or tokens.shape != (manifest.sample_length,):
        raise DataError(
            f"{where}: expected {manifest.dtype}[{manifest.sample_length}] "
            f"(seq_length {manifest.seq_length} + 1), got {tokens.dtype}{list(tokens.shape)}"
        )
    top = int(tokens.max())
    if top >= manifest.vocab_size:
        raise DataError(f"{where}: token id {top} is outside the vocabulary (vocab_size {manifest.vocab_size})")
    return tokens

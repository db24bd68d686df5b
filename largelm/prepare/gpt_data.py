"""Tokenize documents and pack them into fixed-length webdataset shards (format: ``largelm.data.format``).

Every document is tokenized, followed by ``eos``, and appended to one running token stream per split; the
stream is cut into non-overlapping samples of ``seq_length + 1`` tokens, so samples cross document
boundaries (standard GPT packing, no padding). What is left at the end (fewer than ``seq_length + 1``
tokens) is not written and is reported as ``dropped_tokens`` in the manifest.

The ``valid_fraction`` of documents whose text hashes lowest go to ``valid`` (at least one): the split does
not depend on input order, and duplicate documents always land in the same split (no train/valid leakage).
This reads the inputs twice (hashing is cheap next to tokenizing).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import webdataset as wds

from largelm.data.format import (
    MANIFEST_NAME,
    TOKENS_FIELD,
    DataError,
    Manifest,
    ShardInfo,
    encode_tokens,
    sample_key,
    token_dtype,
    write_manifest,
)
from largelm.data.remote import as_location, is_remote, join, remote_split_exists, upload_split
from largelm.fileio import sha256_file
from largelm.prepare.documents import check_input_files, iter_documents
from largelm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def document_bucket(text: str) -> int:
    """Stable 64-bit hash of a document's text."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def valid_cutoff(buckets: Sequence[int], valid_fraction: float) -> Optional[int]:
    """Largest bucket that goes to valid: the ``valid_fraction`` of documents with the lowest hashes.

    At least one document goes to valid (when ``valid_fraction > 0``) and at least one stays in train, so a
    small corpus (the default one has ~50 works) still gets both splits.
    """
    if valid_fraction <= 0 or not buckets:
        return None
    count = min(max(1, round(valid_fraction * len(buckets))), max(len(buckets) - 1, 1))
    return sorted(buckets)[count - 1]


@dataclass
class SplitWriter:
    """Packs one split's token stream into samples and samples into tar shards."""

    split_dir: Path
    split: str
    seq_length: int
    vocab_size: int
    samples_per_shard: int
    num_documents: int = field(default=0, init=False)
    shards: list[ShardInfo] = field(default_factory=list, init=False)
    _writer: Optional[wds.ShardWriter] = field(default=None, init=False, repr=False)
    _num_samples: int = field(default=0, init=False)
    _shard_samples: int = field(default=0, init=False)
    # Extra manifest fields, e.g. {"kind": "bert_pairs", "pair_objective": "sop"} (largelm.prepare.bert_data).
    manifest_extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dtype = np.dtype(token_dtype(self.vocab_size))
        self._pending = np.empty(0, dtype=self.dtype)
        self.split_dir.mkdir(parents=True, exist_ok=True)

    @property
    def sample_length(self) -> int:
        return self.seq_length + 1

    def add_document(self, ids: Sequence[int], eos_id: int) -> None:
        self.num_documents += 1
        doc = np.asarray([*ids, eos_id], dtype=np.int64)
        if doc.min() < 0 or doc.max() >= self.vocab_size:  # would wrap around in the narrow dtype
            raise DataError(
                f"{self.split}: document #{self.num_documents} has token ids outside 0..{self.vocab_size - 1}"
            )
        stream = np.concatenate([self._pending, doc.astype(self.dtype)])
        full = len(stream) // self.sample_length
        for i in range(full):
            self._write_sample(stream[i * self.sample_length : (i + 1) * self.sample_length])
        self._pending = stream[full * self.sample_length :]

    def add_sample(self, tokens: Sequence[int]) -> None:
        """Write one whole, already laid-out sample of exactly ``seq_length + 1`` ids (no packing)."""
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.shape != (self.sample_length,):
            raise DataError(f"{self.split}: sample of shape {arr.shape}, expected ({self.sample_length},)")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise DataError(f"{self.split}: sample has token ids outside 0..{self.vocab_size - 1}")
        self._write_sample(arr.astype(self.dtype))

    def _write_sample(self, tokens: np.ndarray) -> None:
        if self._writer is None:  # opened lazily: ShardWriter creates its first file on construction
            # ShardWriter fills the pattern with "%", so a literal "%" in the directory must be escaped.
            pattern = str(self.split_dir).replace("%", "%%") + f"/{self.split}-%06d.tar"
            # mtime=0 makes the tar bytes (and so the manifest sha256s) reproducible.
            self._writer = wds.ShardWriter(
                pattern, maxcount=self.samples_per_shard, verbose=0, mtime=0, post=self._shard_done
            )
        self._writer.write({"__key__": sample_key(self._num_samples), TOKENS_FIELD: encode_tokens(tokens)})
        self._num_samples += 1
        self._shard_samples += 1

    def _shard_done(self, fname: str) -> None:
        # Called by ShardWriter before the first sample of the next shard is counted.
        path = Path(fname)
        self.shards.append(
            ShardInfo(
                file=path.name,
                num_samples=self._shard_samples,
                num_tokens=self._shard_samples * self.sample_length,
                num_bytes=path.stat().st_size,
                sha256=sha256_file(path),
            )
        )
        self._shard_samples = 0

    def finish(
        self, *, eos_id: int, tokenizer_sha256: str, empty_documents: int = 0, dropped_tokens: int = 0,
        inputs: Sequence[str] = (),
    ) -> Manifest:
        """Close the last shard and write ``manifest.json``; the unpacked tail plus the ``dropped_tokens`` the caller
        left out before the writer (BERT pairs: ``largelm.prepare.bert_data``) are reported as dropped_tokens."""
        if self._writer is not None:
            self._writer.close()
        if self._num_samples == 0:
            raise DataError(
                f"split {self.split!r} got {self.num_documents} documents and {len(self._pending)} tokens from "
                f"{list(inputs)}: not enough for one sample of seq_length + 1 = {self.sample_length} tokens "
                f"(add text, lower --seq-length{', or raise --valid-fraction' if self.split == 'valid' else ''})"
            )
        manifest = Manifest(
            split=self.split,
            seq_length=self.seq_length,
            sample_length=self.sample_length,
            dtype=self.dtype.name,
            vocab_size=self.vocab_size,
            eos_id=eos_id,
            tokenizer_sha256=tokenizer_sha256,
            shards=self.shards,
            num_samples=self._num_samples,
            num_tokens=self._num_samples * self.sample_length,
            num_documents=self.num_documents,
            empty_documents=empty_documents,
            dropped_tokens=len(self._pending) + dropped_tokens,
            inputs=list(inputs),
            **self.manifest_extra,
        )
        write_manifest(self.split_dir, manifest)
        return manifest


def _clear_split_dir(split_dir: Path, split: str, overwrite: bool) -> None:
    old = sorted(split_dir.glob(f"{split}-*.tar")) + [p for p in [split_dir / MANIFEST_NAME] if p.exists()]
    if old and not overwrite:
        raise DataError(f"{split_dir} already holds prepared data ({old[0].name}, ...); pass --overwrite to replace it")
    for path in old:  # only files we would write ourselves; anything else in the directory is left alone
        path.unlink()
    split_dir.mkdir(parents=True, exist_ok=True)


def prepare_data(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: str | Path | Tokenizer,
    seq_length: int,
    *,
    samples_per_shard: int = 1000,
    valid_fraction: float = 0.01,
    text_field: str = "text",
    overwrite: bool = False,
) -> dict[str, Manifest]:
    """Write ``<out_dir>/train`` (and ``<out_dir>/valid`` when ``valid_fraction > 0``); return the manifests."""
    if seq_length <= 0 or samples_per_shard <= 0:
        raise DataError(f"seq_length ({seq_length}) and samples_per_shard ({samples_per_shard}) must be positive")
    if not 0 <= valid_fraction < 1:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    files = check_input_files(inputs)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    out_dir = Path(out_dir)
    splits = ["train"] + (["valid"] if valid_fraction > 0 else [])
    writers = {}
    for split in splits:
        _clear_split_dir(out_dir / split, split, overwrite)
        writers[split] = SplitWriter(out_dir / split, split, seq_length, tok.vocab_size, samples_per_shard)

    buckets = [document_bucket(doc.text) for doc in iter_documents(files, text_field) if doc.text.strip()]
    cutoff = valid_cutoff(buckets, valid_fraction)
    empty = {split: 0 for split in splits}
    for doc in iter_documents(files, text_field):
        split = "valid" if cutoff is not None and document_bucket(doc.text) <= cutoff else "train"
        if not doc.text.strip():
            empty[split] += 1  # nothing to learn from; counted in the manifest rather than dropped silently
            log.warning("%s: empty document, not written", doc.source)
            continue
        writers[split].add_document(tok.encode(doc.text), tok.eos_id)

    manifests = {}
    for split, writer in writers.items():
        manifest = writer.finish(
            eos_id=tok.eos_id, tokenizer_sha256=tok.sha256, empty_documents=empty[split], inputs=[str(f) for f in files]
        )
        manifests[split] = manifest
        log.info(
            "%s: %d documents -> %d samples in %d shards (%d tokens, %d tail tokens dropped)",
            split, manifest.num_documents, manifest.num_samples, len(manifest.shards), manifest.num_tokens,
            manifest.dropped_tokens,
        )
    return manifests


def prepare_arguments(description: str, *, tokenizer_help: str, seq_length_help: str) -> argparse.ArgumentParser:
    """The command-line options every ``largelm-prepare-*`` tool shares (``run_prepare`` consumes them); a tool
    adds its own options to the parser it gets."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--input", nargs="+", required=True, help=".txt (one document per file) or .jsonl files")
    parser.add_argument("--tokenizer", required=True, help=tokenizer_help)
    parser.add_argument("--out", required=True, help="output directory, or an s3:// prefix (shards uploaded, each "
                        "manifest last); gets train/ and valid/")
    parser.add_argument("--seq-length", type=int, required=True, help=seq_length_help)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--valid-fraction", type=float, default=0.01,
                        help="fraction of documents for valid/ (at least one document; 0 = no valid split)")
    parser.add_argument("--text-field", default="text", help="jsonl field holding the text")
    parser.add_argument("--overwrite", action="store_true", help="replace shards and manifests already there")
    return parser


def run_prepare(args: argparse.Namespace, prepare: Callable[..., dict[str, Manifest]],
                describe: Callable[[Manifest], str], **options) -> int:
    """Run ``prepare(inputs, out, tokenizer, seq_length, ..., **options)`` with the shared options of
    ``prepare_arguments``, then print one line per split written (``describe`` says what it holds).
    Returns the exit code: 1, with the error on stderr, when the data or the arguments are bad."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if is_remote(args.out):  # written here, then uploaded split by split (each manifest after its shards)
            for split in ("train", "valid"):  # refused before the work, not after it
                remote_split_exists(str(join(args.out, split)), args.overwrite)
            with tempfile.TemporaryDirectory(prefix="largelm-prepare-") as staging:
                manifests = prepare(
                    args.input, staging, args.tokenizer, args.seq_length, samples_per_shard=args.samples_per_shard,
                    valid_fraction=args.valid_fraction, text_field=args.text_field, **options,
                )
                for split in manifests:
                    upload_split(Path(staging) / split, str(join(args.out, split)), args.overwrite)
        else:
            manifests = prepare(
                args.input, args.out, args.tokenizer, args.seq_length, samples_per_shard=args.samples_per_shard,
                valid_fraction=args.valid_fraction, text_field=args.text_field, overwrite=args.overwrite, **options,
            )
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for split, m in manifests.items():
        print(f"{join(as_location(args.out), split)}: {describe(m)}")
    return 0


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = prepare_arguments("Tokenize .txt/.jsonl documents into packed webdataset shards.",
                               tokenizer_help="sentencepiece .model file",
                               seq_length_help="model sequence length (samples hold +1)")
    args = parser.parse_args(None if argv is None else list(argv))
    return run_prepare(args, prepare_data, lambda m: f"{m.num_samples} samples, {len(m.shards)} shards, "
                                                     f"{m.dropped_tokens} dropped tokens")


if __name__ == "__main__":
    sys.exit(main())

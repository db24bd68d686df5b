"""Which samples each reader reads, and reading them out of tar shards with checks.

Splitting works on *sample ranges* of the epoch's shard sequence. An epoch lists every shard of a dataset
(shuffled per epoch when training); ``split_by_rank`` gives each data-parallel rank a contiguous, equal share
of that sequence (±1 sample) and ``split_by_worker`` divides the rank's share among its DataLoader workers
the same way. A reader opens only the shards its share overlaps: about ``shards / slots`` whole shards plus
at most one partial shard at each end. Compared with dealing out whole shards this

* keeps every (rank, worker) slot at the same number of samples per epoch, so in infinite mode no slot
  cycles through its data faster than another, and in validation every rank does the same work;
* needs no minimum shard count: with fewer shards than slots the slots simply share shards.

Both splitters take rank/world size explicitly (no torch.distributed globals), so they work without a
process group.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
from webdataset.tariterators import group_by_keys

from largelm.data.format import TOKENS_FIELD, DataError, Manifest, ShardInfo, decode_sample
from largelm.data.remote import Location, RemoteSettings, ShardFetcher, check_remote_shards, is_remote, join
from largelm.fileio import sha256_file

log = logging.getLogger(__name__)

# Purposes mixed into every seed so the shard order, blend and shuffle RNGs never share a stream.
SEED_SHARD_ORDER, SEED_BLEND, SEED_SHUFFLE = 0, 1, 2


def seed_words(*values: int) -> list[int]:
    """Entropy words for numpy's SeedSequence (which needs non-negative ints)."""
    return [int(v) % 2**64 for v in values]


@dataclass(frozen=True)
class ShardRange:
    path: str  # tar file
    start: int  # first sample index inside the shard
    stop: int  # one past the last
    position: int = 0  # position of ``start`` in the epoch's global order (largelm.data.position)

    @property
    def size(self) -> int:
        return self.stop - self.start


def epoch_shards(
    manifest: Manifest, split_dir: Location, *, epoch: int, seed: int, dataset_index: int, shuffle: bool
) -> list[ShardRange]:
    """Every shard of the dataset in this epoch's order (a permutation seeded by seed and epoch)."""
    order = np.arange(len(manifest.shards))
    if shuffle:
        rng = np.random.default_rng(seed_words(seed, SEED_SHARD_ORDER, dataset_index, epoch))
        order = rng.permutation(len(manifest.shards))
    sizes = [manifest.shards[i].num_samples for i in order]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist() if sizes else []
    return [
        ShardRange(str(join(split_dir, manifest.shards[i].file)), 0, size, start)
        for i, size, start in zip(order, sizes, starts)
    ]


def take_part(ranges: Iterable[ShardRange], part: int, num_parts: int) -> list[ShardRange]:
    """The ``part``-th of ``num_parts`` contiguous, equal (±1 sample) pieces of the concatenated ranges."""
    ranges = list(ranges)
    if not 0 <= part < num_parts:
        raise ValueError(f"part {part} is outside 0..{num_parts - 1}")
    total = sum(r.size for r in ranges)
    lo, hi = total * part // num_parts, total * (part + 1) // num_parts
    out, offset = [], 0
    for r in ranges:
        begin, end = max(lo, offset), min(hi, offset + r.size)
        if begin < end:
            out.append(ShardRange(r.path, r.start + begin - offset, r.start + end - offset,
                                  r.position + begin - offset))
        offset += r.size
    return out


def split_by_rank(ranges: Iterable[ShardRange], rank: int, world_size: int) -> list[ShardRange]:
    return take_part(ranges, rank, world_size)


def split_by_worker(ranges: Iterable[ShardRange], worker: int, num_workers: int) -> list[ShardRange]:
    return take_part(ranges, worker, num_workers)


def check_shard_files(manifest: Manifest, split_dir: Location, remote: Optional[RemoteSettings] = None) -> None:
    """Cheap up-front check (existence and size) of every shard; the sha256 is checked when a shard is read."""
    if is_remote(split_dir):
        check_remote_shards(manifest, split_dir, remote or RemoteSettings())
        return
    for info in manifest.shards:
        path = split_dir / info.file
        if not path.is_file():
            raise DataError(f"shard {path} listed in {split_dir / 'manifest.json'} is missing")
        size = path.stat().st_size
        if size != info.num_bytes:
            raise DataError(
                f"shard {path} is {size} bytes but the manifest says {info.num_bytes} (truncated or replaced?)"
            )


# The only member a shard holds per sample (largelm.prepare writes nothing else), and the most bytes one may take:
# the sample's array plus room for its .npy header (128 bytes in practice).
_MEMBER_RE = re.compile(rf"^s\d{{10}}\.{re.escape(TOKENS_FIELD)}$")
_NPY_HEADER_ROOM = 4096


@dataclass(frozen=True)
class _Refused:
    """A sample member that was not read (see ``ShardReader._members``), and why."""

    cause: str


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issparse():
        return "sparse file"
    return {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.DIRTYPE: "directory"}.get(
        member.type, "special file")


# (shard, expected sha256) -> the file's identity (size, mtime, inode) when this process hashed it; each DataLoader
# worker hashes a shard once and checks the identity at every later open (a shard rewritten under a running job,
# e.g. data preparation re-run into the same directory, must stop the run, not be served).
_hashed: dict[tuple[str, str], tuple[int, int, int]] = {}


def _identity(stat) -> tuple[int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


class ShardReader:
    """Pipeline stage: ShardRanges in, checked samples ``{"key", "tokens", "position"}`` out (``position``: the
    sample's index in the epoch's global order, from ``ShardRange.position``).

    A bad sample (wrong dtype/length, out-of-vocabulary id, damaged member) or a corrupt tar raises DataError
    naming shard and sample key, unless ``on_bad`` is given: then ``on_bad(message, count)`` is called and
    reading goes on with the next sample (or the next range, when the tar itself cannot be read further).
    """

    def __init__(
        self,
        manifest: Manifest,
        split_dir: Location,
        verify_checksums: bool = True,
        on_bad: Callable[[str, int], None] | None = None,
        remote: Optional[RemoteSettings] = None,
    ):
        self.manifest = manifest
        self.verify_checksums = verify_checksums
        self.on_bad = on_bad
        self._info: dict[str, ShardInfo] = {str(join(split_dir, s.file)): s for s in manifest.shards}
        # Remote shards (largelm.data.remote): downloaded and hashed before they are read, the next one meanwhile.
        self._fetcher = ShardFetcher(remote or RemoteSettings()) if is_remote(split_dir) else None

    def __call__(self, ranges: Iterable[ShardRange]) -> Iterator[dict]:
        if self._fetcher is None:
            for r in ranges:
                yield from self.read(r)
            return
        ranges, downloads = list(ranges), {}
        try:
            for i, r in enumerate(ranges):
                for upcoming in ranges[i:i + 2]:  # this shard and the next one (prefetched while this one is read)
                    if upcoming.path not in downloads:
                        downloads[upcoming.path] = self._fetcher.start(upcoming.path, self._info[upcoming.path])
                yield from self.read(r, downloads.pop(r.path))
        finally:
            for download in downloads.values():
                self._fetcher.discard(download)

    def _bad(self, message: str, count: int = 1) -> None:
        if self.on_bad is None:
            raise DataError(message)
        self.on_bad(message, count)

    def _verify(self, path: str, stream) -> None:
        """sha256 against the manifest at the first open; afterwards the file must still be the one hashed."""
        expected = self._info[path].sha256
        now = _identity(os.fstat(stream.fileno()))
        seen = _hashed.get((path, expected))
        if seen is not None and seen != now:
            raise DataError(f"shard {path} changed while this run reads it (size, mtime or inode differ from when "
                            "its sha256 was checked): was the data prepared again into the same directory? Stop, "
                            "and point the run at a directory that stays as it is")
        if seen is not None:
            return
        if not self.verify_checksums:
            _hashed[(path, expected)] = now
            return
        actual = sha256_file(Path(path))
        self._check_sha256(path, actual)  # raises on a mismatch, unless in skip mode (then warned once per process)
        _hashed[(path, expected)] = now

    def _check_sha256(self, path: str, actual: str) -> None:
        expected = self._info[path].sha256
        if actual == expected:
            return
        message = f"shard {path}: sha256 {actual} does not match the manifest's {expected}"
        if self.on_bad is None:
            raise DataError(message)
        # Skip mode: read it anyway; samples failing the per-sample checks are counted as bad, but damage that
        # still decodes to in-vocabulary ids cannot be detected.
        log.warning("%s; reading it anyway and skipping samples that fail checks", message)

    def _open(self, path: str, download):
        """The shard's bytes as an open binary file, its sha256 checked (remote: each download; local: at the first
        open in this process, then its identity)."""
        if download is None:
            stream = open(path, "rb")
            try:
                self._verify(path, stream)
            except BaseException:
                stream.close()
                raise
            return stream
        stream, actual = download.result()  # RemoteError (unreachable) propagates: it ends the run
        if self.verify_checksums:
            try:
                self._check_sha256(path, actual)
            except BaseException:
                stream.close()
                raise
        return stream

    def _members(self, stream, path: str) -> Iterator[dict]:
        """The shard's members as webdataset's ``{"fname", "data"}`` records, each checked from its tar header
        *before* its data is read: a regular file named ``<key>.tokens.npy`` of at most one sample's size.
        A member with another name is not a sample: reported (skip mode: counted) and left out. A sample member
        that is sparse, special or too large is not read: its record carries a ``_Refused`` with the cause, so the
        sample still counts in the shard's order and is reported under that cause."""
        cap = self.manifest.sample_length * np.dtype(self.manifest.dtype).itemsize + _NPY_HEADER_ROOM
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                where = f"shard {path} member {member.name!r}"
                if not _MEMBER_RE.match(member.name):
                    self._bad(f"{where}: unexpected name (samples are <key>.{TOKENS_FIELD}, key s + 10 digits)")
                    continue
                if not member.isreg() or member.issparse():
                    data = _Refused(f"{where}: a {_member_kind(member)}, not a sample file")
                elif member.size > cap:
                    data = _Refused(f"{where}: {member.size} bytes, more than one sample of this dataset takes "
                                    f"({cap})")
                else:
                    data = tar.extractfile(member).read()
                yield {"fname": member.name, "data": data, "__url__": path}

    def read(self, r: ShardRange, download=None) -> Iterator[dict]:
        """The checked samples of one range (``download``: the remote shard's ``ShardFetcher`` future)."""
        if download is None and self._fetcher is not None:
            download = self._fetcher.start(r.path, self._info[r.path])
        index, last_key = 0, None
        try:
            with self._open(r.path, download) as stream:
                for files_of_sample in group_by_keys(self._members(stream, r.path)):
                    if index >= r.stop:
                        break
                    key = files_of_sample["__key__"]
                    refused = files_of_sample.get(TOKENS_FIELD)
                    if index >= r.start and isinstance(refused, _Refused):
                        self._bad(refused.cause)
                    elif index >= r.start:  # samples before the range belong to another reader: not decoded
                        try:
                            tokens = decode_sample(files_of_sample, self.manifest, f"shard {r.path} sample {key!r}")
                        except DataError as err:
                            self._bad(str(err))
                        else:
                            yield {"key": key, "tokens": tokens, "position": r.position + index - r.start}
                    index, last_key = index + 1, key
        except DataError:
            raise
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            missing = r.stop - max(index, r.start)
            self._bad(
                f"shard {r.path}: tar unreadable after sample {last_key!r} (sample #{index}; "
                f"{missing} of this reader's samples lost): {err}",
                missing,
            )
            return
        if index < r.stop:
            self._bad(
                f"shard {r.path}: ends after {index} samples (last key {last_key!r}) but the manifest lists "
                f"{self._info[r.path].num_samples} (truncated?)",
                r.stop - max(index, r.start),
            )

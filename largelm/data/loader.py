"""``build_loader``: the training/validation loader over prepared shard directories.

Training (``infinite=True``): shards reshuffled every epoch (seed + epoch), a seeded shuffle buffer, several
datasets blended by weight, endless (each worker runs its own epochs, so torch's round-robin over workers
stays exact), and exact mid-epoch resume through ``state_dict`` / ``load_state_dict``.

Validation (``infinite=False``): one ordered pass, no shuffling; datasets are read one after another
(weights are ignored); every rank reads its own equal share. Each ``iter()`` is a fresh pass.

Batch ``k`` of a rank comes from DataLoader worker ``k % num_workers``; the loader records which reader slot
produced each batch and where that slot stands, so the state is exact even with several workers.
``state_dict()`` is **per rank** (each data-parallel rank reads different samples): save and restore one per rank
for a bit-identical resume on the same layout. It records the loader's settings (rank, workers, seed, batch,
datasets' fingerprints, and the sample transform's ``identity()``, e.g. BERT's masking settings); a resume with
different ones is refused, naming each field.

Elastic resume (another data-parallel size or worker count): every sample has a position in its epoch's global
order (independent of the layout), and each rank's state also records which positions it consumed.
``merge_loader_states`` (``largelm.data.loader_state``) turns every rank's state of one moment into a
layout-independent state; ``load_state_dict`` of that state makes each new reader take its share of what remains
of every epoch in progress, so that epoch is still consumed exactly once (rule: ``largelm.data.position`` and
docs/fault_tolerance.md, "Elastic data position").
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader

from largelm.data.format import DataError
from largelm.data.loader_state import (
    LAYOUT_FIELDS,
    STATE_VERSION,
    check_version,
    count,
    differences,
    optional_count,
    parse_rank_records,
    parse_slots,
    slot_epochs,
)
from largelm.data.position import ConsumedSet, DatasetPosition
from largelm.data.remote import Location, RemoteSettings, as_location, read_manifest, take_retries
from largelm.data.shards import check_shard_files
from largelm.data.stream import Source, StreamSettings, TokenStream, batch_to_tensors, collate_samples

DatasetArg = Union[str, Path, tuple, object]  # path, (path, weight), or anything with .path and .weight


def _as_path_weight(item: DatasetArg) -> tuple[Location, float]:
    if isinstance(item, (str, Path)):
        return as_location(item), 1.0
    if isinstance(item, tuple) and len(item) == 2:
        return as_location(item[0]), float(item[1])
    if hasattr(item, "path") and hasattr(item, "weight"):  # e.g. largelm.config.DatasetSpec
        return as_location(item.path), float(item.weight)
    raise TypeError(f"dataset entry {item!r} must be a path, a (path, weight) pair or have .path/.weight")


def open_sources(datasets: Iterable[DatasetArg], seq_length: int, tokenizer_sha256: Optional[str],
                 remote: Optional[RemoteSettings] = None) -> list[Source]:
    sources = []
    for item in datasets:
        path, weight = _as_path_weight(item)
        if not weight > 0:
            raise DataError(f"dataset {path}: weight must be positive, got {weight}")
        manifest = read_manifest(path, remote)
        if manifest.seq_length != seq_length:
            raise DataError(
                f"dataset {path} was prepared with seq_length {manifest.seq_length}, the loader wants {seq_length}"
            )
        if tokenizer_sha256 is not None and manifest.tokenizer_sha256 != tokenizer_sha256:
            raise DataError(
                f"dataset {path} was tokenized with tokenizer sha256 {manifest.tokenizer_sha256}, "
                f"but the run uses {tokenizer_sha256}"
            )
        check_shard_files(manifest, path, remote)
        sources.append(Source(path, weight, manifest, manifest.fingerprint()))
    if not sources:
        raise DataError("no datasets given")
    tokenizers = {s.manifest.tokenizer_sha256 for s in sources}
    if len(tokenizers) > 1:
        found = [(str(s.path), s.manifest.tokenizer_sha256[:12]) for s in sources]
        raise DataError(f"datasets were tokenized with different tokenizers: {found}")
    return sources


class TokenLoader:
    """Iterate for batches ``{"tokens": LongTensor[batch, seq_length + 1], "key": [...], "dataset": LongTensor,
    "epoch": LongTensor}`` (a sample is identified by its dataset, epoch and key)."""

    def __init__(
        self, sources: list[Source], settings: StreamSettings, batch_size: int, num_workers: int, seq_length: int,
        sample_transform=None,
    ):
        self.sources, self.settings = sources, settings
        self.sample_transform = sample_transform
        self.batch_size, self.num_workers, self.seq_length = batch_size, num_workers, seq_length
        self._retries = take_retries()  # made so far in this process (manifests): not inherited by forked workers
        self._reset()

    def _reset(self) -> None:
        self._consumed = 0
        self._next_slot = 0
        self._slots: list[Optional[dict]] = [None] * self.settings.num_slots
        self._bad = 0
        # Per dataset: the global record this layout started from (fresh: every epoch whole), the positions this
        # rank handed out per epoch, and the first epoch whose consumption is known (> 0 after a resume from a
        # state written before positions were recorded).
        self._bases = [DatasetPosition(src.manifest.num_samples) for src in self.sources]
        self._seen: list[dict[int, ConsumedSet]] = [{} for _ in self.sources]
        self._tracked_from = [0] * len(self.sources)

    @property
    def bad_samples(self) -> int:
        """Bad samples skipped so far (only ever non-zero with skip_bad_samples=True)."""
        return self._bad

    @property
    def retries(self) -> int:
        """Remote requests retried so far by this loader's readers (and by this process before it was built), plus
        ``add_retries`` and what the resumed state carried: the run's count, kept across resumes."""
        self._retries += take_retries()  # reads in this process (a worker-less loader's, manifests) count too
        return self._retries

    def add_retries(self, count: int) -> None:
        """Count retries made for the same run elsewhere (its validation loaders) here, in the resume state too."""
        self._retries += count

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch (training; summed over datasets) or per pass (validation)."""
        rank, world = self.settings.rank, self.settings.world_size
        counts = [src.manifest.num_samples for src in self.sources]
        return sum(n * (rank + 1) // world - n * rank // world for n in counts)

    def __iter__(self) -> Iterator[dict]:
        if not self.settings.infinite:
            self._reset()
        dataset = TokenStream(self.sources, self.settings, self._next_slot, list(self._slots), self.sample_transform,
                              list(self._bases))
        loader = DataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_samples,
            drop_last=False,
            # Our own generator: otherwise every iter() draws from torch's global RNG (worker base seed) and a
            # resumed run's dropout/init randomness would drift from the uninterrupted run's.
            generator=torch.Generator().manual_seed(self.settings.seed % 2**63),
            worker_init_fn=_ignore_stop_signals,
        )
        batches = iter(loader)
        try:
            for batch in batches:
                self._bad += batch.pop("_bad")
                self._retries += batch.pop("_retries")
                state = batch.pop("_state")
                if "tokens" not in batch:  # end-of-pass marker carrying only a bad-sample count
                    continue
                self._slots[state["slot"]] = {"samples": state["samples"], "positions": state["positions"]}
                positions = batch.pop("_position")
                if self.settings.infinite:
                    for d, epoch, position in zip(batch["dataset"].tolist(), batch["epoch"].tolist(),
                                                  positions.tolist()):
                        self._seen[d].setdefault(epoch, ConsumedSet()).add(position)
                self._next_slot = (state["slot"] + 1) % self.settings.num_slots
                self._consumed += 1
                yield batch_to_tensors(batch)
        finally:
            # Stop the workers now. After an error the traceback keeps torch's iterator alive, and when the
            # garbage collector finally tears it down the worker shutdown stalls ~5 s per worker.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    # --- resume ---------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        s = self.settings
        identity = {
            "rank": s.rank, "world_size": s.world_size, "num_workers": self.num_workers, "seed": s.seed,
            "batch_size": self.batch_size, "seq_length": self.seq_length, "shuffle_buffer": s.shuffle_buffer,
            "infinite": s.infinite,
            "datasets": [
                {"path": str(src.path), "weight": src.weight, "fingerprint": src.fingerprint} for src in self.sources
            ],
        }
        transform = _transform_identity(self.sample_transform)
        if transform is not None:  # only then: loaders without one (GPT) keep the state they always had
            identity["sample_transform"] = transform
        return identity

    def _position(self) -> list[dict]:
        """Per dataset, this rank's part of the layout-independent record (``largelm.data.position``); epochs that
        every reader has finished are dropped (the rank has consumed its whole piece of them)."""
        out = []
        for d, base in enumerate(self._bases):
            first = min(slot_epochs(self._slots, d, base.complete_before))
            self._seen[d] = {e: seen for e, seen in self._seen[d].items() if e >= first}
            self._bases[d] = base = base.trimmed(first)
            entry = {"base": base.to_json(),
                     "consumed": [[e, [list(r) for r in self._seen[d][e].ranges()]] for e in sorted(self._seen[d])]}
            if self._tracked_from[d] > first:
                entry["tracked_from"] = self._tracked_from[d]
            out.append(entry)
        return out

    def state_dict(self) -> dict:
        """JSON-serialisable position after the batches consumed so far (this rank's ``"rank"`` state)."""
        return {
            "version": STATE_VERSION,
            "kind": "rank",
            **self._identity(),
            "consumed_batches": self._consumed,
            "bad_samples": self._bad,
            "retries": self.retries,
            "next_slot": self._next_slot,
            "slots": [
                None if s is None else {"samples": s["samples"], "positions": [list(p) for p in s["positions"]]}
                for s in self._slots
            ],
            "position": self._position(),
        }

    def same_layout(self, state: dict) -> bool:
        """Can ``state`` resume this loader exactly (a ``"rank"`` state of this rank, world size and workers)?
        Otherwise the layout-independent state (``merge_loader_states``) is what to load."""
        mine = self._identity()
        return (isinstance(state, dict) and state.get("kind", "rank") == "rank"
                and all(state.get(k) == mine[k] for k in LAYOUT_FIELDS))

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batches recorded in ``state``; call before iterating.

        A ``"rank"`` state (``state_dict()``) continues exactly, on the same layout only. A ``"global"`` state
        (``merge_loader_states`` of every rank's) continues on any layout: this rank's readers take their shares
        of what remains of each epoch in progress. The data-parallel rank 0 takes over the bad-sample and retry
        counts. The retry count of ``state`` is added to this loader's (retries made before the load count too)."""
        if not self.settings.infinite:
            raise DataError(
                "a validation loader (infinite=False) starts a fresh pass on every iteration; it has no state to resume"
            )
        version = check_version(state)
        found = differences(state, self._identity())
        if found:
            raise DataError("loader state does not match this loader: " + "; ".join(found))
        sizes = [src.manifest.num_samples for src in self.sources]
        self._reset()
        if state.get("kind") == "global":
            self._load_global(state, sizes)
            return
        slots = parse_slots(state, self.settings.num_slots, len(self.sources))
        if version == 1:  # written before positions were recorded: known from the epochs after the current ones
            self._tracked_from = [max(slot_epochs(slots, d, 0)) + 1 for d in range(len(sizes))]
        else:
            records = parse_rank_records(state, slots, sizes)
            self._bases = [r.base for r in records]
            self._seen = [{e: ConsumedSet(ranges) for e, ranges in r.consumed.items()} for r in records]
            self._tracked_from = [r.tracked_from for r in records]
        self._slots = slots
        self._next_slot = count(state, "next_slot")
        self._consumed = count(state, "consumed_batches")
        self._bad = count(state, "bad_samples")
        self._retries += optional_count(state, "retries")

    def _load_global(self, state: dict, sizes: list[int]) -> None:
        position = state.get("position")
        if not isinstance(position, list) or len(position) != len(sizes):
            raise DataError(f"loader state field position: expected one entry per dataset ({len(sizes)}), got "
                            f"{position!r:.80}")
        self._bases = [DatasetPosition.from_json(p, f"position[{d}]", sizes[d]) for d, p in enumerate(position)]
        self._bad = count(state, "bad_samples") if self.settings.rank == 0 else 0
        self._retries += optional_count(state, "retries") if self.settings.rank == 0 else 0


def _ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 (preemption) to their rank, which checkpoints and then stops them:
    a worker killed by the signal would fail the rank's next batch before the checkpoint is written."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _transform_identity(transform) -> Optional[dict]:
    """The sample transform's settings for the resume identity (e.g. ``BertMasker.identity()``), or None for no
    transform or one that does not describe itself."""
    identity = getattr(transform, "identity", None)
    return None if identity is None else identity()


def build_loader(
    datasets: Sequence[DatasetArg],
    seq_length: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 1,
    shuffle_buffer: int = 1000,
    seed: int = 1234,
    infinite: bool = True,
    skip_bad_samples: bool = False,
    verify_checksums: bool = True,
    tokenizer_sha256: Optional[str] = None,
    sample_transform=None,
    kind: str = "tokens",
    remote: Optional[RemoteSettings] = None,
) -> TokenLoader:
    """Loader over prepared split directories (each with ``manifest.json``); see the module docstring.

    ``tokenizer_sha256``: when given, every dataset must have been tokenized with that tokenizer.
    ``verify_checksums``: check each shard's sha256 the first time a worker opens it (size is always checked).
    ``remote``: timeouts, retries and cache for datasets at http(s):// or s3:// prefixes (``largelm.data.remote``).
    ``kind``: the manifests' sample kind every dataset must have (``"tokens"`` for GPT, ``"bert_pairs"``).
    ``sample_transform``: per-sample function run in the workers (see ``TokenStream``), e.g. ``BertMasker``; its
    extra numpy fields become batch tensors of the same name. If it has an ``identity()`` method (a JSON-able
    dict of its settings), that is part of the resume state and must match on ``load_state_dict``.
    """
    if batch_size <= 0 or seq_length <= 0:
        raise ValueError(f"batch_size ({batch_size}) and seq_length ({seq_length}) must be positive")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size})")
    if num_workers < 0 or shuffle_buffer < 0:
        raise ValueError(f"num_workers ({num_workers}) and shuffle_buffer ({shuffle_buffer}) must be >= 0")
    sources = open_sources(datasets, seq_length, tokenizer_sha256, remote)
    for src in sources:
        if src.manifest.kind != kind:
            raise DataError(f"dataset {src.path} holds samples of kind {src.manifest.kind!r}, "
                            f"this loader reads {kind!r}")
    settings = StreamSettings(
        rank=rank, world_size=world_size, num_slots=max(num_workers, 1), seed=seed, shuffle_buffer=shuffle_buffer,
        infinite=infinite, skip_bad_samples=skip_bad_samples, verify_checksums=verify_checksums,
        remote=remote or RemoteSettings(),
    )
    if infinite:
        slots = world_size * settings.num_slots
        for src in sources:
            if src.manifest.num_samples < slots:
                raise DataError(
                    f"dataset {src.path} has {src.manifest.num_samples} samples, fewer than the {slots} readers "
                    f"(world_size {world_size} x num_workers {settings.num_slots}); every reader needs at least one: "
                    "prepare more data or use fewer workers"
                )
    return TokenLoader(sources, settings, batch_size, num_workers, seq_length, sample_transform)

"""Reading W&B runs back from disk, without syncing them anywhere: the environment that keeps a test's W&B
offline and inside its tmp dir, and a reader of a run's transaction log (``run-<id>.wandb``).

wandb (0.31) has no Python reader of that log any more (``wandb.sdk.internal.datastore`` went with the Python
backend; the Go ``wandb-core`` writes it). Its format is LevelDB's log format with W&B's file header: a 7-byte
header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each ``<crc32 u32><length u16><type
u8><payload>`` (crc32/IEEE of the type byte then the payload; types full=1, first=2, middle=3, last=4; a block
tail under 7 bytes is zero padding). The payloads joined are serialized ``wandb_internal_pb2.Record`` messages,
read with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import math
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from wandb.proto import wandb_internal_pb2

HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
STEP_METRIC = "train/step"


def offline_env(tmp: Path) -> dict[str, str]:
    """Environment for a test's W&B: offline, quiet, no code/git capture, config and cache in ``tmp``, and a
    server address nobody listens on (so even a mode slip cannot send anything off this machine)."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true",
            "WANDB_DISABLE_GIT": "true", "WANDB_DIR": str(tmp / "wandb-default"),
            "WANDB_CONFIG_DIR": str(tmp / "wandb-config"), "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
            "WANDB_DATA_DIR": str(tmp / "wandb-data"), "WANDB_BASE_URL": "http://127.0.0.1:9"}


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of a transaction log, checksums verified. A log cut short (the writer was killed) ends at its
    last complete record; a bad checksum anywhere else is an error."""
    data = Path(path).read_bytes()
    if len(data) < len(HEADER):
        return  # killed before its first flush
    assert data[:len(HEADER)] == HEADER, f"{path}: not a W&B transaction log (header {data[:7]!r})"
    pos, pending = len(HEADER), b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:  # zero-filled rest of the block (or of a file cut at a block boundary)
            pos += left_in_block
            continue
        payload = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        if len(payload) < length:
            return  # cut short by a kill
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += CHUNK_HEADER + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class WandbRun:
    dir: Path
    id: Optional[str] = None
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one dict per ``run.log`` call
    exit_code: Optional[int] = None  # None: no exit record (the run was killed)
    resumed: bool = False


def read_run(run_dir: Path) -> WandbRun:
    """A run directory (``offline-run-<time>-<id>``) read back from its transaction log."""
    logs = sorted(Path(run_dir).glob("run-*.wandb"))
    assert len(logs) == 1, f"{run_dir}: expected one run-*.wandb, found {logs}"
    run = WandbRun(Path(run_dir))
    for record in records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.id = record.run.run_id
            run.resumed = record.run.resumed
            run.config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_runs(wandb_dir: Path, timeout_s: float = 60.0) -> list[WandbRun]:
    """Every offline run under ``<dir>/wandb``, oldest first (the directory names start with the start time), each
    finished. wandb-core, a separate process, writes a run's log through a buffer that it flushes when it closes the
    run's stream, and ``finish()`` only publishes that request (``service.inform_finish``, not awaited), so the
    flush can come after it returned (seen on a loaded machine: a log still empty); so this waits, at most
    ``timeout_s``, until every log holds its exit record, and returns what is there by then."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = [read_run(d) for d in sorted((Path(wandb_dir) / "wandb").glob("offline-run-*"))]
        if all(r.exit_code is not None for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def scalars(runs: list[WandbRun]) -> dict[str, dict[int, float]]:
    """tag -> {train/step: value} over ``runs`` in order (a later run wins on a repeated step, as tb_scalars);
    W&B's own keys (``_step``, ``_runtime``, ``_timestamp``) and the x-axis itself left out."""
    out: dict[str, dict[int, float]] = {}
    for run in runs:
        for row in run.history:
            step = row[STEP_METRIC]
            for tag, value in row.items():
                if not tag.startswith("_") and tag != STEP_METRIC:
                    out.setdefault(tag, {})[step] = value
    return out


def scalar_differences(wandb: dict[str, dict[int, float]], tensorboard: dict[str, dict[int, float]]) -> list[str]:
    """Where W&B's scalars are not tensorboard's: a tag or step in one only, or another value. W&B holds the
    float64 the trainer logged, tensorboard its float32: W&B's rounded to float32 must be tensorboard's exactly
    (one number stored twice, no tolerance); NaN matches NaN."""
    out = [f"tag {t} only in {'W&B' if t in wandb else 'tensorboard'}" for t in wandb.keys() ^ tensorboard.keys()]
    for tag in wandb.keys() & tensorboard.keys():
        mine, theirs = wandb[tag], tensorboard[tag]
        out += [f"{tag} step {s} only in {'W&B' if s in mine else 'tensorboard'}" for s in mine.keys() ^ theirs.keys()]
        for step in mine.keys() & theirs.keys():
            a, b = float(np.float32(mine[step])), theirs[step]
            if not (a == b or (math.isnan(a) and math.isnan(b))):
                out.append(f"{tag} step {step}: W&B {mine[step]!r} vs tensorboard {b!r}")
    return sorted(out)

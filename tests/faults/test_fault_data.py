"""Data faults: a missing shard, a truncated or corrupt tar, a sample of the wrong length or with out-of-vocabulary
ids. Default: a ``DataError`` naming the shard (and the sample where there is one) - before launch when it can be
seen from sizes alone, else when read, ending the whole job promptly. ``skip_bad_samples``: the sample is logged
and counted, never dropped silently: every sample is either delivered or counted (``data lost`` = the rest)."""

from __future__ import annotations

import collections
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from faultkit import first_shards_read, rewrite_sample, run

from largelm import launch
from largelm.data import DataError, build_loader, merge_loader_states
from largelm.data.format import encode_tokens
from largelm.fileio import sha256_file

TOTAL = 40  # samples in the synthetic split: 4 shards of 10, seq_length 8


def _shard(split, i):
    return split / f"train-{i:06d}.tar"


def _refresh_manifest(split):
    manifest = json.loads((split / "manifest.json").read_text())
    for info in manifest["shards"]:
        path = split / info["file"]
        info["sha256"], info["num_bytes"] = sha256_file(path), path.stat().st_size
    (split / "manifest.json").write_text(json.dumps(manifest))


def _missing(split):
    _shard(split, 1).unlink()


def _size_changed(split):
    path = _shard(split, 2)
    path.write_bytes(path.read_bytes()[:3000])


def _truncated_tar(split):  # manifest made to agree, so only reading the tar can tell
    path = _shard(split, 3)
    path.write_bytes(path.read_bytes()[: 1024 * 4 + 700])  # 4 whole samples, then a broken member header
    _refresh_manifest(split)


def _flipped_byte(split):  # same size, sha256 differs; the flipped byte makes a token id > vocab
    path = _shard(split, 1)
    data = bytearray(path.read_bytes())
    data[512 + 128 + 1] ^= 0xFF  # high byte of the first token of the shard's first sample
    path.write_bytes(bytes(data))


def _wrong_length(split):
    rewrite_sample(_shard(split, 0), 4, encode_tokens(np.arange(1, 6, dtype=np.uint16)))


def _out_of_vocab(split):
    rewrite_sample(_shard(split, 2), 7, encode_tokens(np.full(9, 4321, dtype=np.uint16)))


# name -> (damage, strict error, skip-mode outcome: None = refused up front in both modes, else samples lost)
CASES = {
    "missing shard": (_missing, r"shard \S+train-000001\.tar listed in \S+manifest\.json is missing", None),
    "truncated shard (size differs from the manifest)": (
        _size_changed, r"shard \S+train-000002\.tar is 3000 bytes but the manifest says \d+ \(truncated", None),
    "truncated tar (manifest rewritten to match)": (
        _truncated_tar, r"shard \S+train-000003\.tar: tar unreadable after sample 's0000000033' \(sample #4; "
                        r"6 of this reader's samples lost\)", 6),
    "corrupt byte in a shard (sha256 mismatch)": (
        _flipped_byte, r"shard \S+train-000001\.tar: sha256 \w+ does not match the manifest", 1),
    "sample of the wrong length": (
        _wrong_length, r"shard \S+train-000000\.tar sample 's0000000004': expected uint16\[9\] "
                       r"\(seq_length 8 \+ 1\), got uint16\[5\]", 1),
    "sample with out-of-vocabulary token ids": (
        _out_of_vocab, r"shard \S+train-000002\.tar sample 's0000000027': token id 4321 is outside the vocabulary", 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_data_fault_names_shard_and_sample_or_is_counted(case, make_token_shards, tmp_path, caplog, ledger):
    damage, message, lost = CASES[case]
    split = make_token_shards(tmp_path / "split", TOTAL)
    damage(split)
    with ledger.scenario(f"data fault: {case}") as sc:
        with pytest.raises(DataError, match=message):
            for _ in build_loader([split], 8, 4, num_workers=0, infinite=False):
                pass
        if lost is None:  # a whole shard gone is not a bad sample: refused in skip mode too
            with pytest.raises(DataError, match=message):
                build_loader([split], 8, 4, num_workers=0, infinite=False, skip_bad_samples=True)
            return
        loader = build_loader([split], 8, 4, num_workers=0, infinite=False, skip_bad_samples=True)
        with caplog.at_level(logging.WARNING):
            delivered = sum(len(b["key"]) for b in loader)
        assert loader.bad_samples == lost and delivered == TOTAL - lost
        sc["data_lost"] = TOTAL - delivered - loader.bad_samples  # neither delivered nor counted
        assert sc["data_lost"] == 0
        assert re.search(r"skipping \d+ bad sample\(s\): shard \S+train-00000\d\.tar", caplog.text), caplog.text


@pytest.mark.parametrize("name", ["missing", "truncated"])
def test_launcher_refuses_missing_or_truncated_shard(name, run_config, shard_dir, copy_split, tmp_path, capsys,
                                                     ledger):
    train = copy_split(shard_dir / "train")
    {"missing": _missing, "truncated": _size_changed}[name](train)
    with ledger.scenario(f"{name} shard: refused by the launcher before any process starts"):
        config = run_config(tmp_path, data={"train": [{"path": str(train)}]})
        assert launch.main(["--config", str(config), "--nproc", "2"]) == 2
        err = capsys.readouterr().err
        assert re.search(r"data\.train\[0\]: shard \S+train-00000[12]\.tar (listed in|is 3000 bytes)", err), err


@pytest.mark.slow
def test_bad_sample_during_training_fails_the_job_promptly(run_config, shard_dir, copy_split, tmp_path, ledger):
    train = copy_split(shard_dir / "train")
    (shard, start) = first_shards_read(train, seed=7)[1]  # the first shard data-parallel rank 1 reads
    key = rewrite_sample(Path(shard), start + 2, encode_tokens(np.arange(1, 9, dtype=np.uint16)))
    with ledger.scenario("sample of the wrong length met by rank 1 mid-training (strict mode)"):
        result = run(run_config(tmp_path, data={"train": [{"path": str(train)}]}))
        assert result.returncode == 1, result.output[-4000:]
        assert re.search(rf"error \(rank 1\): .*shard \S+{re.escape(shard.split('/')[-1])} sample '{key}': "
                         r"expected uint16\[33\]", result.output, re.DOTALL), result.output[-4000:]
        # Without the fail-fast path the launcher waits 30 s for the healthy rank (or a collective times out).
        assert result.seconds_after_error < 28, f"the job took {result.seconds_after_error:.0f}s to end"


def test_loader_position_moved_to_another_data_parallel_size(make_token_shards, tmp_path, ledger):
    """Resume on another data-parallel size (2 -> 3 ranks) from the merged loader position: the epoch in progress
    is read exactly once (nothing lost, nothing repeated); a tampered position is refused naming the field."""
    split = make_token_shards(tmp_path / "split", TOTAL)

    def loader(rank, world):
        return build_loader([split], 8, 4, rank=rank, world_size=world, num_workers=0, shuffle_buffer=4, seed=2)

    def epoch0_keys(it, batches):
        keys = []
        for _, batch in zip(range(batches), it):
            keys += [k for k, e in zip(batch["key"], batch["epoch"].tolist()) if e == 0]
        return keys

    with ledger.scenario("data-parallel size changed on resume (2 -> 3 ranks): data position moved") as sc:
        seen, states = [], []
        for rank in range(2):
            old = loader(rank, 2)
            seen += epoch0_keys(old, 2)  # 16 of the epoch's 40 samples
            states.append(old.state_dict())
        merged = merge_loader_states(states)
        for rank in range(3):
            new = loader(rank, 3)
            new.load_state_dict(merged)
            seen += epoch0_keys(new, 10)  # 120 samples: every reader finishes epoch 0
        counts = collections.Counter(seen)
        sc["data_lost"] = TOTAL - len(counts)
        assert sc["data_lost"] == 0 and set(counts.values()) == {1}, counts
    with ledger.scenario("tampered loader position in a checkpoint: refused naming the field"):
        states[0]["position"][0]["consumed"] = [[0, [[9, 2]]]]
        with pytest.raises(DataError, match=r"position\[0\]\.consumed\[0\] \(epoch 0\) range 0"):
            loader(0, 2).load_state_dict(states[0])

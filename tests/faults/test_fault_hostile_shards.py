"""Shards are read with bounds: every tar member is checked from its header before its data is read (a 20 KB shard
must not cost gigabytes), only ``<key>.tokens.npy`` regular files of one sample's size are samples, bytes after the
array are refused, and a shard rewritten under a running job stops the run instead of being served. Skip mode
counts each refused sample under its real cause."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from largelm.data import DataError, build_loader
from largelm.data.format import encode_tokens, sample_key
from largelm.fileio import sha256_file


@pytest.fixture
def split(make_token_shards, tmp_path):
    """A private synthetic split: 40 samples of seq_length 8 in 4 shards of 10."""
    return make_token_shards(tmp_path / "split", 40)


def _shard(split_dir, i: int):
    return split_dir / json.loads((split_dir / "manifest.json").read_text())["shards"][i]["file"]


def _refresh_manifest(split_dir) -> None:
    """The attacker controls the manifest too: it vouches for the crafted shard (so the bounds are what fires)."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    for shard in manifest["shards"]:
        path = split_dir / shard["file"]
        shard["sha256"], shard["num_bytes"] = sha256_file(path), path.stat().st_size
    (split_dir / "manifest.json").write_text(json.dumps(manifest))


def _rebuild_with_gnu_tar(split_dir, i: int, edit) -> None:
    """Unpack shard ``i``, let ``edit(dir)`` change its member files, pack it again with GNU tar (--sparse)."""
    path = _shard(split_dir, i)
    work = path.parent / f"unpacked-{i}"
    work.mkdir()
    with tarfile.open(path) as tar:
        names = tar.getnames()
        tar.extractall(work, filter="data")
    names = edit(work, names)
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(path), "-C", str(work), *names], check=True)
    shutil.rmtree(work)
    _refresh_manifest(split_dir)


def _read_all(split_dir, **kwargs) -> list[str]:
    loader = build_loader([split_dir], 8, 4, num_workers=0, infinite=False, **kwargs)
    keys = [k for batch in loader for k in batch["key"]]
    return keys if not kwargs.get("skip_bad_samples") else (keys, loader.bad_samples)


def test_sparse_gigabyte_member_is_refused_unread(split, ledger):
    def sparse(work, names):
        with open(work / f"{sample_key(13)}.tokens.npy", "r+b") as fh:
            fh.truncate(1 << 30)  # a 1 GiB sample file that occupies a few KB in the tar (GNU sparse)
        return names

    with ledger.scenario("sparse 1 GiB member in a 20 KB shard"):
        _rebuild_with_gnu_tar(split, 1, sparse)
        assert _shard(split, 1).stat().st_size < 64 * 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        with pytest.raises(DataError, match=rf"train-000001\.tar member '{sample_key(13)}\.tokens\.npy': a sparse "
                                            "file, not a sample file"):
            _read_all(split)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 * 1024  # < 256 MiB more at peak


def test_oversized_member_is_refused_before_it_is_read(split, ledger):
    def huge(work, names):
        (work / f"{sample_key(22)}.tokens.npy").write_bytes(b"\x93NUMPY" + b"x" * (1 << 20))
        return names

    with ledger.scenario("1 MiB member where a sample takes 146 bytes"):
        _rebuild_with_gnu_tar(split, 2, huge)
        with pytest.raises(DataError, match=rf"member '{sample_key(22)}\.tokens\.npy': 1048582 bytes, more than one "
                                            r"sample of this dataset takes \(4114\)"):
            _read_all(split)


@pytest.mark.parametrize("name,kind", [("../escape.tokens.npy", "unexpected name"),
                                       (f"{sample_key(5)}.txt", "unexpected name"),
                                       ("link", "unexpected name")])
def test_unexpected_member_names_are_refused_naming_them(split, ledger, name, kind):
    with ledger.scenario(f"unexpected tar member {name!r}"):
        extra = split / "extra"
        extra.write_bytes(b"hello")
        with tarfile.open(_shard(split, 0), "a") as tar:  # tarfile keeps a "../" name (GNU tar strips it)
            tar.add(extra, arcname=name)
        _refresh_manifest(split)
        with pytest.raises(DataError, match=rf"train-000000\.tar member {name!r}: {kind}"):
            _read_all(split)


def test_symlink_sample_member_is_refused(split, ledger):
    def link(work, names):
        victim = work / f"{sample_key(3)}.tokens.npy"
        victim.unlink()
        os.symlink("/etc/hostname", victim)
        return names

    with ledger.scenario("sample member that is a symlink to /etc/hostname"):
        _rebuild_with_gnu_tar(split, 0, link)
        with pytest.raises(DataError, match=rf"member '{sample_key(3)}\.tokens\.npy': a symlink, not a sample file"):
            _read_all(split)


def test_trailing_bytes_after_the_array_are_refused(split, ledger):
    def trailing(work, names):
        path = work / f"{sample_key(31)}.tokens.npy"
        path.write_bytes(encode_tokens(np.arange(9, dtype=np.uint16)) + b"EXTRA")
        return names

    with ledger.scenario("sample with bytes after its .npy array"):
        _rebuild_with_gnu_tar(split, 3, trailing)
        with pytest.raises(DataError, match=rf"sample '{sample_key(31)}': tokens\.npy has 5 bytes after its array"):
            _read_all(split)


def test_skip_mode_counts_each_refused_sample_under_its_cause(split, ledger, caplog):
    def damage(work, names):
        with open(work / f"{sample_key(13)}.tokens.npy", "r+b") as fh:
            fh.truncate(1 << 30)
        (work / "notes.txt").write_text("stray")
        return names + ["notes.txt"]

    with ledger.scenario("skip mode: sparse sample and a stray member, each counted once"):
        _rebuild_with_gnu_tar(split, 1, damage)
        with caplog.at_level(logging.WARNING):
            keys, bad = _read_all(split, skip_bad_samples=True)
        assert sorted(keys) == [sample_key(i) for i in range(40) if i != 13]  # no sample lost or shifted
        assert bad == 2
        assert "a sparse file" in caplog.text and "'notes.txt': unexpected name" in caplog.text


def test_shard_rewritten_under_a_running_job_stops_the_run(split, ledger):
    """Data preparation re-run into the directory a job reads (another tokenizer): epoch 2 must not serve it."""
    loader = build_loader([split], 8, 4, num_workers=0, infinite=True, shuffle_buffer=0, seed=1)
    batches = iter(loader)
    for _ in range(10):  # one whole epoch (40 samples): every shard hashed and its identity recorded
        next(batches)
    with ledger.scenario("shards rewritten while the run reads them"):
        for i in range(4):  # same names, new files (as a re-run of prepare writes them)
            path = _shard(split, i)
            replacement = path.with_name(path.name + ".new")
            shutil.copyfile(path, replacement)
            os.replace(replacement, path)
        with pytest.raises(DataError, match=r"train-00000\d\.tar changed while this run reads it"):
            for _ in range(10):
                next(batches)

"""Bad input must fail loudly, naming the file/shard/sample; skip mode must count what it skips."""

import json
import logging

import numpy as np
import pytest
import webdataset as wds

from largelm.data import DataError, build_loader
from largelm.data.format import encode_tokens, sample_key
from largelm.fileio import sha256_file


@pytest.fixture
def split(make_token_shards, tmp_path):
    """A private synthetic split: 40 samples of seq_length 8 in 4 shards of 10."""
    return make_token_shards(tmp_path / "split", 40)


def _manifest(split_dir):
    return json.loads((split_dir / "manifest.json").read_text())


def _shard(split_dir, i):
    return split_dir / _manifest(split_dir)["shards"][i]["file"]


def _refresh_checksums(split_dir):
    """Make the manifest agree with damaged files, so the per-sample / tar-level checks are what fires."""
    manifest = _manifest(split_dir)
    for shard in manifest["shards"]:
        path = split_dir / shard["file"]
        shard["sha256"], shard["num_bytes"] = sha256_file(path), path.stat().st_size
    (split_dir / "manifest.json").write_text(json.dumps(manifest))


def _rewrite_shard(split_dir, i, replace):
    """Rewrite shard ``i`` with sample ``key`` -> ``replace[key]`` (raw .npy bytes) where given."""
    path = _shard(split_dir, i)
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    with wds.TarWriter(str(path), mtime=0) as writer:
        for s in samples:
            writer.write({"__key__": s["__key__"], "tokens.npy": replace.get(s["__key__"], s["tokens.npy"])})
    _refresh_checksums(split_dir)


def _all_keys(loader):
    return [k for batch in loader for k in batch["key"]]


def test_missing_or_resized_shard_fails_up_front(split):
    _shard(split, 2).unlink()
    with pytest.raises(DataError, match=r"train-000002\.tar listed in .* is missing"):
        build_loader([split], 8, 4)
    (split / "train-000002.tar").write_bytes(b"x" * 512)
    with pytest.raises(DataError, match=r"train-000002\.tar is 512 bytes but the manifest says"):
        build_loader([split], 8, 4)


def test_missing_manifest_and_wrong_seq_length(split, tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        build_loader([tmp_path], 8, 4)
    with pytest.raises(DataError, match="prepared with seq_length 8, the loader wants 16"):
        build_loader([split], 16, 4)
    with pytest.raises(DataError, match="tokenized with tokenizer sha256 0000"):
        build_loader([split], 8, 4, tokenizer_sha256="f" * 64)
    with pytest.raises(DataError, match="40 samples, fewer than the 48 readers"):
        build_loader([split], 8, 4, world_size=8, rank=3, num_workers=6)


def test_checksum_mismatch_names_the_shard(split):
    path = _shard(split, 1)
    data = bytearray(path.read_bytes())
    data[512 + 128 + 4] ^= 0xFF  # tar header, .npy header, then the first sample's tokens; size unchanged
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard .*train-000001\.tar: sha256 .* does not match the manifest"):
        _all_keys(build_loader([split], 8, 4, num_workers=0, infinite=False))
    assert len(_all_keys(build_loader([split], 8, 4, num_workers=0, infinite=False, verify_checksums=False))) == 40


def test_wrong_length_sample_names_shard_and_key(split, caplog):
    short = encode_tokens(np.arange(1, 9, dtype=np.uint16))  # 8 tokens instead of seq_length + 1 = 9
    _rewrite_shard(split, 1, {sample_key(13): short})
    expected = r"train-000001\.tar sample 's0000000013': expected uint16\[9\].*got uint16\[8\]"
    with pytest.raises(DataError, match=expected):
        _all_keys(build_loader([split], 8, 4, num_workers=0, infinite=False))
    loader = build_loader([split], 8, 4, num_workers=0, infinite=False, skip_bad_samples=True)
    with caplog.at_level(logging.WARNING):
        keys = _all_keys(loader)
    assert loader.bad_samples == 1
    assert sorted(keys) == [sample_key(i) for i in range(40) if i != 13]
    assert "s0000000013" in caplog.text


def test_out_of_vocab_and_undecodable_samples(split):
    _rewrite_shard(split, 0, {sample_key(2): encode_tokens(np.full(9, 5000, dtype=np.uint16)), sample_key(5): b"junk"})
    with pytest.raises(DataError, match=r"sample 's0000000002': token id 5000 is outside the vocabulary"):
        _all_keys(build_loader([split], 8, 4, num_workers=0, infinite=False))
    with pytest.raises(DataError, match=r"train-000000\.tar sample 's0000000002'"):  # raised in a worker process
        _all_keys(build_loader([split], 8, 4, num_workers=2, seed=3))
    loader = build_loader([split], 8, 4, num_workers=2, infinite=False, skip_bad_samples=True)
    assert len(_all_keys(loader)) == 38
    assert loader.bad_samples == 2  # counted in the workers, reported to the main process


def test_truncated_tar_names_shard_and_last_key(split):
    path = _shard(split, 3)
    per_sample = 512 + 512  # tar header + the 146-byte .npy padded to one block
    path.write_bytes(path.read_bytes()[: per_sample * 4 + 700])  # 4 whole samples, then a broken header
    _refresh_checksums(split)
    with pytest.raises(DataError, match=r"train-000003\.tar: tar unreadable after sample 's0000000033'"):
        _all_keys(build_loader([split], 8, 4, num_workers=0, infinite=False))
    loader = build_loader([split], 8, 4, num_workers=0, infinite=False, skip_bad_samples=True)
    assert len(_all_keys(loader)) == 34
    assert loader.bad_samples == 6


def test_skip_mode_in_training_keeps_exact_resume(split):
    _rewrite_shard(split, 2, {sample_key(21): b"junk", sample_key(27): b"junk"})

    def make():
        return build_loader([split], 8, 4, num_workers=2, shuffle_buffer=8, seed=4, skip_bad_samples=True)

    reference = make()
    ref_keys = [b["key"] for _, b in zip(range(25), reference)]
    # Two bad samples per epoch; 25 batches reach into the third epoch (counted when met while reading).
    assert reference.bad_samples in (4, 6)
    assert not any("s0000000021" in keys or "s0000000027" in keys for keys in ref_keys)
    loader = make()
    _ = [b for _, b in zip(range(10), loader)]
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    assert [b["key"] for _, b in zip(range(15), resumed)] == ref_keys[10:]
    assert resumed.bad_samples == reference.bad_samples  # replayed samples are not counted twice


def test_mismatched_resume_state_is_refused(split, make_token_shards, tmp_path):
    loader = build_loader([(split, 1.0)], 8, 4, num_workers=2, seed=1)
    _ = [b for _, b in zip(range(3), loader)]
    state = loader.state_dict()
    assert "sample_transform" not in state  # no transform (GPT): the state is as it always was
    cases = [
        (dict(num_workers=1), r"num_workers: state has 2, loader has 1"),
        (dict(seed=2), r"seed: state has 1, loader has 2"),
        (dict(world_size=2, rank=0), r"world_size: state has 1, loader has 2"),
        (dict(batch_size=8), r"batch_size: state has 4, loader has 8"),
        (dict(datasets=[(split, 2.0)]), r"weight 1\.0 in state, 2\.0 now"),
        (dict(datasets=[(make_token_shards(tmp_path / "other", 41), 1.0)]), r"datasets\[0\] .*contents differ"),
        (dict(datasets=[(split, 1.0), (split, 1.0)]), r"datasets: state has 1, loader has 2"),
    ]
    for overrides, message in cases:
        kwargs = dict(datasets=[(split, 1.0)], seq_length=8, batch_size=4, num_workers=2, seed=1) | overrides
        with pytest.raises(DataError, match=message):
            build_loader(**kwargs).load_state_dict(state)
    with pytest.raises(DataError, match="validation loader"):
        build_loader([split], 8, 4, infinite=False).load_state_dict(state)
    with pytest.raises(DataError, match="version"):
        build_loader([split], 8, 4, num_workers=2, seed=1).load_state_dict({**state, "version": 99})


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank 2 is outside"):
        build_loader([], 8, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        build_loader([], 8, 0)
    with pytest.raises(DataError, match="no datasets"):
        build_loader([], 8, 4)
    with pytest.raises(TypeError, match="must be a path"):
        build_loader([("a", 1.0, "extra")], 8, 4)
    with pytest.raises(DataError, match="weight must be positive"):
        build_loader([("a", 0.0)], 8, 4)

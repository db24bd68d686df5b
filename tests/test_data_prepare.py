import io
import json
import tarfile

import numpy as np
import pytest

from largelm.data.format import DataError, read_manifest, sample_key
from largelm.fileio import sha256_file
from largelm.prepare.gpt_data import document_bucket, main, prepare_data, valid_cutoff
from largelm.tokenizer import Tokenizer


def _read_tar(path):
    """{key: tokens} straight from the tar with the standard library (independent of the loader)."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            assert ext == "tokens.npy"
            samples[key] = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
    return samples


@pytest.mark.parametrize("split", ["train", "valid"])
def test_manifest_matches_tar_contents(shard_dir, tokenizer_path, split):
    manifest = read_manifest(shard_dir / split)
    tok = Tokenizer.load(tokenizer_path)
    assert manifest.tokenizer_sha256 == tok.sha256 and manifest.vocab_size == tok.vocab_size == 1000
    assert manifest.dtype == "uint16" and manifest.eos_id == tok.eos_id
    assert manifest.sample_length == manifest.seq_length + 1 == 33
    assert len(manifest.shards) > 1  # several shards, so the splitting tests are meaningful
    keys, total_tokens = [], 0
    for shard in manifest.shards:
        path = shard_dir / split / shard.file
        assert sha256_file(path) == shard.sha256 and path.stat().st_size == shard.num_bytes
        samples = _read_tar(path)
        assert len(samples) == shard.num_samples
        for tokens in samples.values():
            assert tokens.dtype == np.uint16 and tokens.shape == (33,)
            total_tokens += len(tokens)
        keys += list(samples)
    assert total_tokens == manifest.num_tokens == manifest.num_samples * 33
    assert keys == [sample_key(i) for i in range(manifest.num_samples)]
    assert sorted(p.name for p in (shard_dir / split).glob("*.tar")) == [s.file for s in manifest.shards]


def test_packing_keeps_every_token(shard_dir, small_corpus, tokenizer_path):
    """The samples are exactly the concatenated documents + eos; only the reported tail is missing."""
    tok = Tokenizer.load(tokenizer_path)
    docs = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()]
    cutoff = valid_cutoff([document_bucket(d) for d in docs], 0.2)
    split_of = {d: "valid" if document_bucket(d) <= cutoff else "train" for d in docs}
    assert sum(s == "valid" for s in split_of.values()) == round(0.2 * len(docs))
    for split in ("train", "valid"):
        manifest = read_manifest(shard_dir / split)
        expected = [i for d in docs if split_of[d] == split for i in tok.encode(d) + [tok.eos_id]]
        stored = np.concatenate(
            [t for s in manifest.shards for t in _read_tar(shard_dir / split / s.file).values()]
        )
        assert manifest.num_documents == sum(split_of[d] == split for d in docs) > 0
        assert len(expected) == manifest.num_tokens + manifest.dropped_tokens
        assert 0 <= manifest.dropped_tokens < manifest.sample_length
        assert stored.tolist() == expected[: manifest.num_tokens]
        first_doc = next(d for d in docs if split_of[d] == split)
        assert first_doc.startswith(tok.decode(stored[:50].tolist()))  # the shards hold the real text


def test_valid_split_is_never_empty_and_ignores_order():
    buckets = [document_bucket(f"doc {i}") for i in range(50)]
    assert valid_cutoff(buckets, 0.0) is None
    assert sum(b <= valid_cutoff(buckets, 0.001) for b in buckets) == 1  # 0.05 documents rounds up to one
    assert sum(b <= valid_cutoff(buckets, 0.1) for b in buckets) == 5
    assert valid_cutoff(buckets[::-1], 0.1) == valid_cutoff(buckets, 0.1)
    assert sum(b <= valid_cutoff(buckets[:2], 0.9) for b in buckets[:2]) == 1  # train keeps one


def test_output_is_reproducible(small_corpus, tokenizer_path, tmp_path):
    a = prepare_data([small_corpus], tmp_path / "a", tokenizer_path, 16, samples_per_shard=100, valid_fraction=0.3)
    b = prepare_data([small_corpus], tmp_path / "b", tokenizer_path, 16, samples_per_shard=100, valid_fraction=0.3)
    assert [s.sha256 for s in a["train"].shards] == [s.sha256 for s in b["train"].shards]
    assert a["valid"].fingerprint() == b["valid"].fingerprint()


def test_text_files_and_empty_documents(tmp_path, tokenizer_path):
    verse = "Now is the winter of our discontent\nMade glorious summer by this sun of York.\n"
    (tmp_path / "a.txt").write_text(verse * 3)
    (tmp_path / "b.jsonl").write_text('{"body": "Friends, Romans, countrymen, lend me your ears."}\n\n{"body": "  "}\n')
    manifests = prepare_data(
        [tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "out", tokenizer_path, 8,
        valid_fraction=0, text_field="body",
    )
    assert set(manifests) == {"train"} and not (tmp_path / "out" / "valid").exists()
    m = manifests["train"]
    assert (m.num_documents, m.empty_documents) == (2, 1)  # the blank jsonl line is no record at all


def test_bad_jsonl_line_is_named(tmp_path, tokenizer_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        prepare_data([bad], tmp_path / "out", tokenizer_path, 8)
    bad.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no field 'text'"):
        prepare_data([bad], tmp_path / "out2", tokenizer_path, 8)
    bad.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'text' must be a string"):
        prepare_data([bad], tmp_path / "out3", tokenizer_path, 8)


def test_refuses_to_mix_with_existing_output_and_too_little_text(small_corpus, tokenizer_path, tmp_path):
    prepare_data([small_corpus], tmp_path / "out", tokenizer_path, 16, valid_fraction=0.2)
    with pytest.raises(DataError, match="already holds prepared data"):
        prepare_data([small_corpus], tmp_path / "out", tokenizer_path, 16, valid_fraction=0.2)
    prepare_data([small_corpus], tmp_path / "out", tokenizer_path, 24, valid_fraction=0.2, overwrite=True)
    assert read_manifest(tmp_path / "out" / "train").seq_length == 24
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Alas, poor Yorick!")
    with pytest.raises(DataError, match="not enough for one sample"):
        prepare_data([tiny], tmp_path / "tiny_out", tokenizer_path, 64, valid_fraction=0)


def test_command_line(small_corpus, tokenizer_path, tmp_path, capsys):
    args = ["--input", str(small_corpus), "--tokenizer", str(tokenizer_path), "--out", str(tmp_path / "o"),
            "--seq-length", "16", "--samples-per-shard", "50", "--valid-fraction", "0.25"]
    assert main(args) == 0
    train = read_manifest(tmp_path / "o" / "train")
    assert all(s.num_samples == 50 for s in train.shards[:-1]) and train.shards[-1].num_samples <= 50
    assert main(args) == 1 and "--overwrite" in capsys.readouterr().err

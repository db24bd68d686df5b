"""Runtime data path: packed webdataset shards -> the resumable training loader.

    format.py       manifest schema and per-sample encoding (shared with ``largelm.prepare``, which writes shards)
    shards.py       epoch shard order, rank/worker splitting, checked shard reading
    blend.py        weighted per-sample choice between datasets
    stream.py       the per-worker sample stream (IterableDataset)
    loader.py       build_loader / TokenLoader: batches, state_dict / load_state_dict
    loader_state.py the resume state: checks, and merging every rank's into a layout-independent one
    position.py     the layout-independent data position (which samples of each epoch are consumed)
    bert_masking.py BERT's dynamic masking, applied in the stream
    remote.py       shards at http(s):// and s3:// prefixes: manifest fetch, checked downloads, retries, cache

Offline preparation (corpus, tokenizer training, tokenize + pack) lives in ``largelm.prepare``.
"""

from largelm.data.format import DataError, Manifest
from largelm.data.loader import TokenLoader, build_loader
from largelm.data.loader_state import merge_loader_states
from largelm.data.remote import RemoteSettings, read_manifest, remote_settings

__all__ = ["DataError", "Manifest", "RemoteSettings", "TokenLoader", "build_loader", "merge_loader_states",
           "read_manifest", "remote_settings"]

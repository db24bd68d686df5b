"""Shards at http(s):// and s3:// prefixes (largelm/data/remote.py) against real servers on 127.0.0.1: a static
HTTP(S) server with Range support (tests/fault_http_server.py) and moto's S3 server (also behind a TLS proxy). The
loader over any of them gives exactly the samples of the same shards read from the local directory, in the same
order, and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from remote_servers import FaultServer, MotoS3, make_tls

from largelm.data import DataError, RemoteSettings, build_loader, merge_loader_states, read_manifest
from largelm.data.remote import take_retries
from largelm.prepare.gpt_data import main

# Small chunks: every shard (about 2-3 KB) takes several ranged GETs, as a real shard of 100s of MB does.
FAST = RemoteSettings(timeout_s=10.0, read_timeout_s=5.0, backoff_s=0.01, chunk_bytes=1024)


@pytest.fixture(scope="module")
def local_splits(make_token_shards, tmp_path_factory):
    """Two synthetic splits: a (96 samples in 10 shards) and b (40 samples in shards of 7)."""
    root = tmp_path_factory.mktemp("remote-src")
    make_token_shards(root / "a", 96)
    make_token_shards(root / "b", 40, samples_per_shard=7)
    return root


@pytest.fixture(scope="module")
def http_server(local_splits, tmp_path_factory):
    server = FaultServer(tmp_path_factory.mktemp("http"), root=local_splits)
    yield server
    server.kill()


@pytest.fixture(scope="module")
def moto(local_splits, tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    for split in ("a", "b"):
        server.upload_dir(local_splits / split, "shards", f"corpus/{split}")
    yield server
    server.stop()


@pytest.fixture(params=["http", "s3"])
def remote(request, local_splits, monkeypatch):
    """``remote(split) -> URL`` of a split on the http server or in moto's S3 (AWS_* variables point at moto)."""
    if request.param == "http":
        server = request.getfixturevalue("http_server")
        return lambda split: server.url(f"{split}/")
    server = request.getfixturevalue("moto")
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    return lambda split: f"s3://shards/corpus/{split}"


def batches(loader, n=None):
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def assert_same(got, want):
    assert [b["key"] for b in got] == [b["key"] for b in want]
    for a, b in zip(got, want):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["dataset"], b["dataset"])
        assert torch.equal(a["epoch"], b["epoch"])


def test_remote_manifest_is_the_local_one(remote, local_splits):
    assert read_manifest(remote("a"), FAST) == read_manifest(local_splits / "a")


def test_training_blend_over_remote_equals_local(remote, local_splits):
    """Shuffled, blended, 2 workers, rank 1 of 2, across an epoch boundary: the same batches, bit for bit."""
    def make(a, b, **kw):
        return build_loader([(a, 2.0), (b, 1.0)], 8, 4, rank=1, world_size=2, num_workers=2, shuffle_buffer=10,
                            seed=5, **kw)

    want = batches(make(local_splits / "a", local_splits / "b"), 30)
    assert_same(batches(make(remote("a"), remote("b"), remote=FAST), 30), want)


def test_validation_pass_over_remote_equals_local(remote, local_splits):
    def make(a):
        return build_loader([a], 8, 5, num_workers=0, infinite=False)

    assert_same(batches(make(remote("a"))), batches(make(local_splits / "a")))


def test_remote_resume_is_exact(remote, local_splits, workers=2, stop=7):
    def make(a, **kw):
        return build_loader([a], 8, 4, num_workers=workers, shuffle_buffer=10, seed=11, **kw)

    want = batches(make(local_splits / "a"), stop + 20)
    loader = make(remote("a"), remote=FAST)
    assert_same(batches(loader, stop), want[:stop])
    resumed = make(remote("a"), remote=FAST)
    resumed.load_state_dict(loader.state_dict())
    assert_same(batches(resumed, 20), want[stop:])
    # a local run's state resumes on the remote copy too (the position is tied to the content, not the place)
    local = make(local_splits / "a")
    batches(local, stop)
    moved = make(remote("a"), remote=FAST)
    moved.load_state_dict(local.state_dict())
    assert_same(batches(moved, 20), want[stop:])


@pytest.mark.parametrize("protocol", ["https", "s3 over tls"])
def test_tls_source_verified_with_remote_ca_file_equals_local_and_resumes(protocol, local_splits, tmp_path,
                                                                         monkeypatch, request):
    """Certificates from a private CA, trusted through ``ca_file`` (data.remote_ca_file): for https:// by the
    aiohttp client, for s3:// (an HTTPS endpoint: a TLS proxy in front of moto) by botocore."""
    tls = make_tls(tmp_path / "tls")
    if protocol == "https":
        server = FaultServer(tmp_path / "https", root=local_splits, tls=tls)
        location = server.url("a/")
    else:
        moto = request.getfixturevalue("moto")
        server = FaultServer(tmp_path / "proxy", upstream=f"127.0.0.1:{moto.port}", tls=tls)
        for key, value in {**moto.env, "AWS_ENDPOINT_URL": server.base}.items():
            monkeypatch.setenv(key, value)
        location = "s3://shards/corpus/a"
    settings = RemoteSettings(timeout_s=10.0, read_timeout_s=5.0, backoff_s=0.01, chunk_bytes=1024,
                              ca_file=str(tls.ca))
    try:
        def make(a, **kw):
            return build_loader([a], 8, 4, num_workers=2, shuffle_buffer=10, seed=11, **kw)

        stop = 7
        want = batches(make(local_splits / "a"), stop + 20)
        loader = make(location, remote=settings)
        assert_same(batches(loader, stop), want[:stop])
        resumed = make(location, remote=settings)
        resumed.load_state_dict(loader.state_dict())
        assert_same(batches(resumed, 20), want[stop:])
        assert any(r["path"].endswith(".tar") for r in server.requests())  # the bytes did come over TLS
    finally:
        server.kill()


def test_retry_count_is_carried_across_a_resume(local_splits, tmp_path):
    """``data/retries`` counts over the whole run: the loader state carries the count (merged states sum it)."""
    server = FaultServer(tmp_path / "http", root=local_splits)
    try:
        server.set_faults([{"match": "train-000001", "kind": "500", "times": 2}])
        take_retries()

        def make():
            return build_loader([server.url("a/")], 8, 4, num_workers=2, shuffle_buffer=10, seed=11, remote=FAST)

        loader = make()
        batches(loader, 20)  # 80 of 96 samples: shard 1 read (and its 2 retries reported by its worker)
        state = loader.state_dict()
        assert state["retries"] == loader.retries == 2
        resumed = make()
        resumed.load_state_dict(state)
        batches(resumed, 10)
        assert resumed.retries == 2 and resumed.state_dict()["retries"] == 2  # fault rules used up: no new ones
        merged = merge_loader_states([state])
        assert merged["retries"] == 2
        moved = build_loader([server.url("a/")], 8, 4, num_workers=1, shuffle_buffer=10, seed=11, remote=FAST)
        moved.load_state_dict(merged)  # another worker count: the layout-independent state
        assert moved.retries == 2
        older = {k: v for k, v in state.items() if k != "retries"}  # a state written before retries were carried
        fresh = make()
        fresh.load_state_dict(older)
        assert fresh.retries == 0
    finally:
        server.kill()


def test_missing_remote_split_is_a_clear_error(remote):
    take_retries()
    with pytest.raises(DataError, match=r"no manifest .*largelm-prepare-data"):
        build_loader([remote("nowhere")], 8, 4, remote=FAST)
    assert take_retries() == 0  # a 404 is not retried


def test_cache_dir_serves_later_epochs_and_stays_bounded(http_server, local_splits, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    shard_bytes = read_manifest(local_splits / "a").shards[0].num_bytes
    bound = 3 * shard_bytes
    settings = RemoteSettings(timeout_s=10.0, backoff_s=0.01, chunk_bytes=1024, cache_dir=str(cache),
                              cache_max_bytes=bound)

    def make(a, **kw):
        return build_loader([a], 8, 4, num_workers=0, shuffle_buffer=10, seed=3, **kw)

    want = batches(make(local_splits / "a"), 60)  # 2.5 epochs
    assert_same(batches(make(http_server.url("a"), remote=settings), 60), want)
    cached = list(cache.glob("*.tar"))
    assert cached and sum(p.stat().st_size for p in cached) <= bound
    assert not list(cache.glob(".partial-*"))
    # served from the cache: no request for shard bytes reaches the server
    full = RemoteSettings(timeout_s=10.0, backoff_s=0.01, chunk_bytes=1024, cache_dir=str(cache))
    batches(make(http_server.url("a"), remote=full), 30)  # fills the cache with every shard
    http_server.clear_log()
    assert_same(batches(make(http_server.url("a"), remote=full), 60), want)
    assert not [r for r in http_server.requests() if r["method"] == "GET" and r["path"].endswith(".tar")]


def test_prepare_data_uploads_shards_then_the_manifest(moto, small_corpus, tokenizer_path, tmp_path, monkeypatch,
                                                       capsys):
    proxy = FaultServer(tmp_path / "proxy", upstream=f"127.0.0.1:{moto.port}")  # records the order of requests
    try:
        for key, value in {**moto.env, "AWS_ENDPOINT_URL": proxy.base}.items():
            monkeypatch.setenv(key, value)
        common = ["--input", str(small_corpus), "--tokenizer", str(tokenizer_path), "--seq-length", "16",
                  "--samples-per-shard", "50", "--valid-fraction", "0.25"]
        assert main([*common, "--out", str(tmp_path / "local")]) == 0
        assert main([*common, "--out", "s3://shards/prepared/"]) == 0
        for split in ("train", "valid"):
            local = read_manifest(tmp_path / "local" / split)
            assert read_manifest(f"s3://shards/prepared/{split}", FAST) == local
            puts = [r["path"] for r in proxy.requests() if r["method"] == "PUT" and f"/prepared/{split}/" in r["path"]]
            assert len(puts) == len(local.shards) + 1 and puts[-1].endswith("/manifest.json")
        # the uploaded copy reads like the local one
        want = batches(build_loader([tmp_path / "local" / "train"], 16, 4, num_workers=0, infinite=False))
        whole_shards = RemoteSettings(timeout_s=10.0, backoff_s=0.01)  # one GET per shard: many shards here
        assert_same(batches(build_loader(["s3://shards/prepared/train"], 16, 4, num_workers=0, infinite=False,
                                         remote=whole_shards)), want)
        capsys.readouterr()
        assert main([*common, "--out", "s3://shards/prepared"]) == 1 and "--overwrite" in capsys.readouterr().err
        proxy.clear_log()
        assert main([*common, "--out", "s3://shards/prepared", "--overwrite"]) == 0
        log = [(r["method"], r["path"]) for r in proxy.requests() if r["method"] in ("PUT", "DELETE")]
        first_put = next(i for i, (m, _) in enumerate(log) if m == "PUT")
        assert ("DELETE", "/shards/prepared/train/manifest.json") in log[:first_put]  # old manifest gone first
    finally:
        proxy.kill()

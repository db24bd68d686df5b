"""Remote shards under real network faults (largelm/data/remote.py): servers on 127.0.0.1 only - a static HTTP(S) server
and a proxy in front of moto's S3 server (tests/fault_http_server.py) that answer 500, cut connections in the middle
of a shard, stall; servers killed outright; a damaged shard; a server without Range support.

Rule under test: a failed request is retried with backoff at the byte offset where it broke (Range request), so
no sample is lost or repeated; each retry is counted (``TokenLoader.retries``, tensorboard ``data/retries``); a
shard unreachable for ``remote_timeout_s`` ends the read with an error naming its URL and the last error.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from faultkit import remote_run_killed_and_resumed
from remote_servers import FaultServer, MotoS3, make_tls
from train_utils import free_port

from largelm.data import DataError, RemoteSettings, build_loader, read_manifest
from largelm.data.remote import RemoteError, take_retries

CHUNK = 1024  # every shard (2-3 KB) takes several ranged GETs, so a fault can hit the middle of one
# read_timeout_s: a stall must outlast it; a slow but live response (a loaded machine: moto is Python) must not
FAST = RemoteSettings(timeout_s=10.0, read_timeout_s=2.0, backoff_s=0.01, chunk_bytes=CHUNK)


@pytest.fixture(scope="module")
def split(make_token_shards, tmp_path_factory) -> Path:
    """96 samples in 10 shards under <root>/a."""
    root = tmp_path_factory.mktemp("remote-faults")
    make_token_shards(root / "a", 96)
    return root


@pytest.fixture(scope="module")
def moto(split, tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    server.upload_dir(split / "a", "shards", "a")
    yield server
    server.stop()


def keys_and_tokens(loader, n):
    out = []
    for batch in loader:
        out.append((batch["key"], batch["tokens"]))
        if len(out) == n:
            break
    return out


def same(got, want) -> int:
    """Batches that differ (keys or tokens) between two reads."""
    return sum(1 for (ka, ta), (kb, tb) in zip(got, want) if ka != kb or not torch.equal(ta, tb)) + abs(
        len(got) - len(want))


def train_loader(location, **kw):
    return build_loader([location], 8, 4, num_workers=2, shuffle_buffer=10, seed=9, **kw)


FAULTS = [  # shard 1: connection cut in mid-shard (not its first chunk), twice; shard 3: 500 x3; shard 5: a stall
    {"match": "train-000001", "kind": "drop", "times": 2, "min_offset": CHUNK},
    {"match": "train-000003", "kind": "500", "times": 3},
    {"match": "train-000005", "kind": "stall", "times": 1, "min_offset": CHUNK, "stall_s": 5},
]


@pytest.mark.parametrize("protocol", ["http", "https", "s3"])
def test_transient_faults_are_retried_without_losing_or_repeating_a_sample(split, protocol, request, tmp_path,
                                                                          monkeypatch, ledger):
    want = keys_and_tokens(train_loader(split / "a"), 30)  # 1.25 epochs, every shard read
    settings = FAST
    if protocol in ("http", "https"):
        tls = make_tls(tmp_path / "tls") if protocol == "https" else None
        server = FaultServer(tmp_path / protocol, root=split, tls=tls)
        location = server.url("a/")
        if tls is not None:  # the certificate verified against the test's CA, faults met over TLS
            settings = dataclasses.replace(FAST, ca_file=str(tls.ca))
    else:  # the proxy forwards to moto: an S3 endpoint that fails like a real one can
        moto = request.getfixturevalue("moto")
        server = FaultServer(tmp_path / "proxy", upstream=f"127.0.0.1:{moto.port}")
        for key, value in {**moto.env, "AWS_ENDPOINT_URL": server.base}.items():
            monkeypatch.setenv(key, value)
        location = "s3://shards/a"
    try:
        server.set_faults(FAULTS)
        take_retries()
        with ledger.scenario(f"{protocol}: 2 connections cut mid-shard, 3 x HTTP 500, 1 read stalled (retried)",
                             injected=6) as sc:
            loader = train_loader(location, remote=settings)
            got = keys_and_tokens(loader, 30)
            sc["data_lost"] = same(got, want)
            assert sc["data_lost"] == 0
            assert loader.retries == 6
            log = server.requests()
            assert sum(1 for r in log if r["fault"]) == 6
            for shard in ("train-000001", "train-000005"):
                ranges = [r["range"] for r in log if r["method"] == "GET" and shard in r["path"]]
                broken = [r["range"] for r in log if r["fault"] and shard in r["path"]]
                # The retry asks again for the chunk that broke (a Range request at its offset), not the shard start:
                # every chunk is fetched once per download of the shard, plus once per fault that hit it.
                assert broken and all(not b.startswith("bytes=0-") for b in broken)
                downloads = ranges.count(f"bytes=0-{CHUNK - 1}")
                assert downloads >= 1
                assert {r: ranges.count(r) for r in ranges} == {r: downloads + broken.count(r) for r in ranges}
    finally:
        server.kill()


@pytest.mark.parametrize("protocol", ["http", "s3"])
def test_killed_server_ends_the_read_in_bounded_time_naming_the_url(split, protocol, tmp_path, monkeypatch, ledger):
    if protocol == "http":
        server = FaultServer(tmp_path / "http", root=split)
        location, kill = server.url("a"), server.kill
    else:
        own = MotoS3(tmp_path / "moto")  # its own server: this test kills it
        own.upload_dir(split / "a", "doomed", "a")
        for key, value in own.env.items():
            monkeypatch.setenv(key, value)
        location, kill = "s3://doomed/a", own.stop
    settings = RemoteSettings(timeout_s=2.0, read_timeout_s=1.0, backoff_s=0.05, chunk_bytes=CHUNK)
    with ledger.scenario(f"{protocol} server killed mid-epoch: bounded failure naming the shard URL"):
        loader = train_loader(location, remote=settings)
        batches = iter(loader)
        next(batches)
        kill()
        began = time.monotonic()
        with pytest.raises(DataError) as err:
            for _ in range(40):  # more than the shards the workers had fetched before the kill
                next(batches)
        elapsed = time.monotonic() - began
        message = str(err.value)
        assert "unreachable for" in message and "remote_timeout_s=2" in message and "last error" in message
        assert f"{location.rstrip('/')}/train-0000" in message
        # bound: timeout_s + one request's connect/read timeout + a worker's shutdown (2 workers each may wait)
        assert elapsed < 2.0 + 1.0 + 10.0, elapsed


def test_remote_sha256_mismatch_is_the_local_error(split, tmp_path, ledger):
    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(split / "a"), str(damaged)], check=True)
    shard = damaged / read_manifest(damaged).shards[2].file
    data = bytearray(shard.read_bytes())
    data[512 + 128 + 4] ^= 0x01  # a token byte of the first sample: still a valid sample, only the sha256 says so
    shard.write_bytes(bytes(data))
    server = FaultServer(tmp_path / "http", root=tmp_path)
    try:
        with ledger.scenario("remote shard whose bytes differ from the manifest's sha256 (strict and skip mode)",
                             injected=2) as sc:
            for location in (damaged, server.url("damaged")):
                with pytest.raises(DataError, match=r"shard \S+train-000002.tar: sha256 [0-9a-f]{64} does not match"):
                    keys_and_tokens(build_loader([location], 8, 4, num_workers=0, infinite=False, remote=FAST), 100)
            local = build_loader([damaged], 8, 4, num_workers=0, infinite=False, skip_bad_samples=True)
            remote = build_loader([server.url("damaged")], 8, 4, num_workers=0, infinite=False,
                                  skip_bad_samples=True, remote=FAST)
            sc["data_lost"] = same(keys_and_tokens(remote, 100), keys_and_tokens(local, 100))
            assert sc["data_lost"] == 0 and remote.bad_samples == local.bad_samples
    finally:
        server.kill()


def test_server_without_range_requests_is_refused_clearly(split, tmp_path, ledger):
    port = free_port()  # python -m http.server answers every GET with the whole file (no Range support)
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(split)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/a"
        deadline = time.monotonic() + 30
        while True:
            try:
                read_manifest(url, RemoteSettings(timeout_s=1.0, backoff_s=0.05))
                break
            except RemoteError:
                assert time.monotonic() < deadline, "http.server did not start"
        with ledger.scenario("http server that ignores Range requests: refused, naming it"):
            with pytest.raises(DataError, match=r"does not honour HTTP Range requests"):
                keys_and_tokens(build_loader([url], 8, 4, num_workers=0, infinite=False, remote=FAST), 100)
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_s3_training_run_with_faults_and_sigkill_matches_local_bit_for_bit(reference_fp32, run_config, shard_dir,
                                                                          tmp_path, monkeypatch, ledger):
    """The fault suite's 2-rank fp32 run reading its shards from S3 through a proxy that fails requests, killed
    with SIGKILL at step 5 and resumed (faults again): the resumed steps' losses and the final checkpoint (weights,
    optimizer, data position) equal the local-shard reference bit for bit, so the steps before the kill read the
    same samples too (the tensorboard file of a SIGKILLed run is not flushed, so those losses are not read)."""
    moto = MotoS3(tmp_path / "moto")
    proxy = FaultServer(tmp_path / "proxy", upstream=f"127.0.0.1:{moto.port}")
    try:
        for split_name in ("train", "valid"):
            moto.upload_dir(shard_dir / split_name, "data", f"run/{split_name}")
        for key, value in {**moto.env, "AWS_ENDPOINT_URL": proxy.base}.items():
            monkeypatch.setenv(key, value)
        # (these shards are smaller than one 8 MiB chunk: each is one GET, so a cut hits it at offset 0 here;
        # mid-shard offsets are the fast tests' business)
        config = run_config(tmp_path, data={"train": [{"path": "s3://data/run/train"}],
                                            "valid": [{"path": "s3://data/run/valid/"}]})
        with ledger.scenario("S3 source with 500s and cut connections, then SIGKILL at step 5 and resume",
                             injected=9) as sc:
            remote_run_killed_and_resumed(proxy, config, tmp_path, reference_fp32, sc)
    finally:
        proxy.kill()
        moto.stop()

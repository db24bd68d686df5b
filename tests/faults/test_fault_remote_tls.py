"""Shards over HTTPS (largelm/data/remote.py): a TLS server on 127.0.0.1 (tests/fault_http_server.py with a
certificate from a private CA made by the test), verified through ``data.remote_ca_file``.

Rules under test: a certificate that does not verify (no CA given, or another CA) ends the read at once with an
error naming the URL and saying what to set - never retried, never a silent fallback to an unverified connection;
a training run over HTTPS, with 500s and cut connections and a SIGKILL, equals the local-shard run bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from faultkit import remote_run_killed_and_resumed
from remote_servers import FaultServer, MotoS3, make_tls

from largelm.data import DataError, RemoteSettings, build_loader, read_manifest
from largelm.data.remote import RemoteError, take_retries


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def https_split(make_token_shards, tls, tmp_path_factory):
    """``(server, local split)``: 40 samples in 5 shards, served over HTTPS."""
    root = tmp_path_factory.mktemp("https-src")
    make_token_shards(root / "a", 40)
    server = FaultServer(tmp_path_factory.mktemp("https"), root=root, tls=tls)
    yield server, root / "a"
    server.kill()


@pytest.mark.parametrize("protocol", ["https", "s3"])
def test_untrusted_certificate_is_a_clear_error_naming_the_url(protocol, https_split, tls, tmp_path, monkeypatch,
                                                               ledger):
    server, local = https_split
    other = make_tls(tmp_path / "other", ca_name="some other CA")
    moto = proxy = None
    try:
        if protocol == "https":
            url = server.url("a/")
        else:  # an S3 endpoint over HTTPS: a TLS proxy in front of moto
            moto = MotoS3(tmp_path / "moto")
            moto.upload_dir(local, "shards", "a")
            proxy = FaultServer(tmp_path / "proxy", upstream=f"127.0.0.1:{moto.port}", tls=tls)
            for key, value in {**moto.env, "AWS_ENDPOINT_URL": proxy.base}.items():
                monkeypatch.setenv(key, value)
            url = "s3://shards/a/"
        # the right CA: the same manifest as the local copy
        assert read_manifest(url, RemoteSettings(ca_file=str(tls.ca))) == read_manifest(local)
        with ledger.scenario(f"{protocol} server whose certificate the client does not trust (no CA / another CA)",
                             injected=2):
            for ca_file in (None, str(other.ca)):
                take_retries()
                # the default 300 s retry window: a certificate error retried like a 5xx would hang here that long
                with pytest.raises(RemoteError, match=rf"{url}manifest.json: TLS certificate verification failed "
                                                      r".*CERTIFICATE_VERIFY_FAILED.*set data.remote_ca_file"):
                    build_loader([url], 8, 4, remote=RemoteSettings(ca_file=ca_file))
                assert take_retries() == 0
        with ledger.scenario(f"{protocol}: data.remote_ca_file missing or not a PEM certificate: named"):
            for bad in (tmp_path / "missing.pem", local / "manifest.json"):
                with pytest.raises(DataError, match=rf"data.remote_ca_file {bad}: cannot be used as a CA bundle"):
                    read_manifest(url, RemoteSettings(ca_file=str(bad)))
    finally:
        if proxy is not None:
            proxy.kill()
        if moto is not None:
            moto.stop()


@pytest.mark.slow
def test_https_training_run_with_faults_and_sigkill_matches_local_bit_for_bit(reference_fp32, run_config, shard_dir,
                                                                             tls, tmp_path, ledger):
    """The fault suite's 2-rank fp32 run reading its shards over HTTPS (certificate verified against the test's
    CA through data.remote_ca_file) from a server that fails requests, killed with SIGKILL at step 5 and resumed
    (faults again): the resumed steps' losses and the final checkpoint (weights, optimizer, data position) equal
    the local-shard reference bit for bit."""
    server = FaultServer(tmp_path / "https", root=Path(shard_dir), tls=tls)
    try:
        config = run_config(tmp_path, data={"train": [{"path": server.url("train")}],
                                            "valid": [{"path": server.url("valid/")}],
                                            "remote_ca_file": str(tls.ca)})
        with ledger.scenario("HTTPS source with 500s and cut connections, then SIGKILL at step 5 and resume",
                             injected=9) as sc:
            remote_run_killed_and_resumed(server, config, tmp_path, reference_fp32, sc)
    finally:
        server.kill()

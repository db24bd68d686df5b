"""Real servers on loopback for the remote-shard tests: a fault-injecting HTTP(S) server (``fault_http_server.py`` in
a subprocess: a static file host, or a proxy in front of S3) and moto's standalone S3 server (``moto.server``);
``make_tls`` writes a private CA and a server certificate for 127.0.0.1 signed by it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address
from pathlib import Path
from typing import Optional

import boto3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from train_utils import free_port

HERE = Path(__file__).resolve().parent
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _wait_for(predicate, what: str, proc: subprocess.Popen, output: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {output.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not start in {timeout}s")
        time.sleep(0.05)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate a client must trust (PEM)
    cert: Path  # the server's certificate for IP 127.0.0.1, signed by the CA (PEM)
    key: Path  # the server's private key (PEM)


def _pem(obj) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def make_tls(workdir: Path, ca_name: str = "largelm test CA") -> TlsFiles:
    """A private CA and a server certificate for 127.0.0.1 (with the extensions OpenSSL's strict checks want)."""
    workdir.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (x509.CertificateBuilder().subject_name(ca_subject).issuer_name(ca_subject)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(workdir / "ca.pem", workdir / "server.pem", workdir / "server.key")
    files.ca.write_bytes(_pem(ca))
    files.cert.write_bytes(_pem(cert))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


class FaultServer:
    """``fault_http_server.py`` serving ``root`` (or forwarding to ``upstream`` "host:port") on 127.0.0.1; over
    HTTPS with ``tls`` (its certificate and key)."""

    def __init__(self, workdir: Path, root: Optional[Path] = None, upstream: Optional[str] = None,
                 tls: Optional[TlsFiles] = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.faults_file, self.log_file = workdir / "faults.json", workdir / "requests.jsonl"
        port_file = workdir / "port"
        port_file.unlink(missing_ok=True)  # the new server writes it once it listens
        self.log_file.unlink(missing_ok=True)
        self.set_faults([])
        cmd = [sys.executable, str(HERE / "fault_http_server.py"), "--faults", str(self.faults_file),
               "--log", str(self.log_file), "--port-file", str(port_file)]
        cmd += ["--root", str(root)] if root is not None else ["--upstream", upstream]
        cmd += ["--certfile", str(tls.cert), "--keyfile", str(tls.key)] if tls is not None else []
        output = workdir / "server.out"  # a file, not a pipe: a pipe nobody reads would block the server
        with open(output, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _wait_for(port_file.is_file, "fault_http_server.py", self.proc, output)
        self.port = int(port_file.read_text())
        self.base = f"{'https' if tls is not None else 'http'}://127.0.0.1:{self.port}"

    def url(self, path: str = "") -> str:
        return f"{self.base}/{path}"

    def set_faults(self, rules: list[dict]) -> None:
        tmp = self.faults_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(rules))
        os.replace(tmp, self.faults_file)

    def requests(self) -> list[dict]:
        if not self.log_file.is_file():
            return []
        return [json.loads(line) for line in self.log_file.read_text().splitlines()]

    def clear_log(self) -> None:
        self.log_file.unlink(missing_ok=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


class MotoS3:
    """moto's S3 server (``python -m moto.server``) on 127.0.0.1; ``env`` is what a client needs to reach it."""

    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        output = workdir / "moto.out"  # moto logs every request: a file, since an unread pipe would block it
        with open(output, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                          str(self.port)], stdout=out, stderr=subprocess.STDOUT)
        _wait_for(self._listening, "moto.server", self.proc, output)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**S3_KEYS, "AWS_ENDPOINT_URL": self.endpoint}

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=S3_KEYS["AWS_DEFAULT_REGION"],
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> str:
        """Upload every file of ``local`` to ``s3://bucket/prefix/`` (bucket made if needed); returns that URL."""
        client = self.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        for path in sorted(Path(local).iterdir()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        return f"s3://{bucket}/{prefix}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

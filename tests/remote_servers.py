"""Real servers on loopback for the remote-shard tests: a fault-injecting HTTP server (``fault_http_server.py`` in
a subprocess: a static file host, or a proxy in front of S3) and moto's standalone S3 server (``moto.server``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import boto3
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


class FaultServer:
    """``fault_http_server.py`` serving ``root`` (or forwarding to ``upstream`` "host:port") on 127.0.0.1."""

    def __init__(self, workdir: Path, root: Optional[Path] = None, upstream: Optional[str] = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.faults_file, self.log_file = workdir / "faults.json", workdir / "requests.jsonl"
        port_file = workdir / "port"
        port_file.unlink(missing_ok=True)  # the new server writes it once it listens
        self.log_file.unlink(missing_ok=True)
        self.set_faults([])
        cmd = [sys.executable, str(HERE / "fault_http_server.py"), "--faults", str(self.faults_file),
               "--log", str(self.log_file), "--port-file", str(port_file)]
        cmd += ["--root", str(root)] if root is not None else ["--upstream", upstream]
        output = workdir / "server.out"  # a file, not a pipe: a pipe nobody reads would block the server
        with open(output, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _wait_for(port_file.is_file, "fault_http_server.py", self.proc, output)
        self.port = int(port_file.read_text())
        self.base = f"http://127.0.0.1:{self.port}"

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

"""A loopback HTTP server for the remote-shard tests, run as a subprocess (``tests/remote_servers.py`` starts it).

Either serves a directory (``--root``; GET/HEAD with Range requests, like a static file host or CDN) or forwards
every request to an upstream server (``--upstream``, e.g. moto's S3 server: an S3 endpoint with faults). Faults
come from a JSON file re-read at every request (``--faults``): a list of rules
``{"match": "<substring of the path>", "kind": "500" | "drop" | "stall", "times": n, "min_offset": bytes,
"stall_s": seconds}``; the first rule whose substring matches a GET, whose ``times`` are not used up and whose
``min_offset`` is at most the requested Range start applies:

* ``500``: an S3-style error body with status 500;
* ``drop``: the real status and headers (full Content-Length), half the body, then the connection is cut;
* ``stall``: the same half body, then nothing for ``stall_s`` seconds, then the connection is cut.

Every request is appended to ``--log`` as one JSON line ``{"method", "path", "range", "fault"}``.
With ``--certfile``/``--keyfile`` it speaks HTTPS (TLS on every connection) instead of plain HTTP.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class Faults:
    def __init__(self, path: Path):
        self.path, self.lock, self.used, self.text = path, threading.Lock(), {}, None

    def take(self, path: str, start: int):
        """The fault rule for this GET (counted as used), or None."""
        with self.lock:
            text = self.path.read_text() if self.path.is_file() else "[]"
            if text != self.text:  # new rules: new counts
                self.text, self.used = text, {}
            for i, rule in enumerate(json.loads(text)):
                if rule["match"] in path and start >= rule.get("min_offset", 0) \
                        and self.used.get(i, 0) < rule.get("times", 1):
                    self.used[i] = self.used.get(i, 0) + 1
                    return rule
        return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "faulty/1"

    def log_message(self, *args):  # quiet: requests go to the JSON log
        pass

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()  # a client refusing the certificate ends this thread here
        super().setup()

    def _record(self, fault):
        entry = {"method": self.command, "path": self.path, "range": self.headers.get("Range"), "fault": fault}
        with self.server.log_lock, open(self.server.log_path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def _range_start(self) -> int:
        m = _RANGE.match(self.headers.get("Range", "") or "")
        return int(m.group(1)) if m else 0

    def _respond(self):
        """(status, headers, body) of the real answer: a file of --root, or the upstream's."""
        if self.server.upstream:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection(*self.server.upstream, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "connection",
                                                                               "content-length")]
            if self.command == "HEAD":  # no body: the upstream's Content-Length is the object's size
                out.append(("Content-Length", resp.getheader("Content-Length", "0")))
            conn.close()
            return resp.status, out, data
        path = self.server.root / unquote(urlsplit(self.path).path).lstrip("/")
        if not path.resolve().is_relative_to(self.server.root.resolve()) or not path.is_file():
            return 404, [("Content-Type", "text/plain")], b"not found"
        data = path.read_bytes()
        m = _RANGE.match(self.headers.get("Range", "") or "")
        if m is None:
            return 200, [("Accept-Ranges", "bytes")], data
        start = int(m.group(1))
        end = min(int(m.group(2)) + 1 if m.group(2) else len(data), len(data))
        if start >= len(data):
            return 416, [("Content-Range", f"bytes */{len(data)}")], b""
        return 206, [("Content-Range", f"bytes {start}-{end - 1}/{len(data)}"), ("Accept-Ranges", "bytes")], \
            data[start:end]

    def _send(self, status, headers, body, head_only=False):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _handle(self):
        rule = self.server.faults.take(self.path, self._range_start()) if self.command == "GET" else None
        self._record(rule and rule["kind"])
        if rule is not None and rule["kind"] == "500":
            body = b"<?xml version='1.0'?><Error><Code>InternalError</Code><Message>injected</Message></Error>"
            self._send(500, [("Content-Type", "application/xml")], body)
            return
        status, headers, body = self._respond()
        if rule is None:
            self._send(status, headers, body, head_only=self.command == "HEAD")
            return
        # drop / stall: promise the whole body, deliver half, then cut the connection
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        if rule["kind"] == "stall":
            time.sleep(float(rule.get("stall_s", 30)))
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root")
    parser.add_argument("--upstream", help="host:port")
    parser.add_argument("--faults", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--certfile", help="PEM certificate (chain): serve HTTPS")
    parser.add_argument("--keyfile", help="PEM private key of --certfile")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if args.certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.certfile, args.keyfile)
        # the handshake runs in the request's thread (Handler.setup), not in the accept loop
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    server.daemon_threads = True
    server.root = Path(args.root) if args.root else None
    server.upstream = tuple(args.upstream.rsplit(":", 1)) if args.upstream else None
    if server.upstream:
        server.upstream = (server.upstream[0], int(server.upstream[1]))
    server.faults, server.log_path, server.log_lock = Faults(Path(args.faults)), args.log, threading.Lock()
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(str(server.server_address[1]))
    os.replace(tmp, args.port_file)  # the test waits for this file: the server is listening
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()

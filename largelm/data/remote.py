"""Shards on HTTP(S) servers and S3-compatible object stores (``path: https://host/prefix/`` or ``s3://bucket/prefix/``).

I/O goes through fsspec: its http filesystem (aiohttp) and s3fs (aiobotocore), so endpoint, region and credentials
of an S3-compatible store come from the standard AWS environment variables and config files (``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws/config`` ...). The libraries' own
retries are switched off: every request is retried here, so each retry is counted (``data/retries``) and the time a
shard may stay unreachable is bounded.

* The manifest is fetched first and validated like a local one; shard names must be plain names under the prefix.
* A shard is downloaded in ranged GETs of ``chunk_bytes`` into an anonymous temporary file (or the cache directory),
  its sha256 computed while it streams, and checked against the manifest *before* any sample is read from it: a
  mismatch is the same error (or, with ``skip_bad_samples``, the same warning and per-sample checks) as for a local
  shard. Each DataLoader worker downloads the next shard of its share while it reads the current one.
* Retry rule: a failed request (5xx, reset or dropped connection, a read stalled for ``read_timeout_s``, a short
  body) is retried with exponential backoff (``backoff_s`` doubling up to ``max_backoff_s``) *at the byte offset of
  the chunk that failed* (a Range request), so no byte is read twice into the shard and none is skipped; the sha256
  then vouches for the whole. A request that keeps failing for ``timeout_s`` (counted from its first failure) ends
  the run with ``RemoteError`` naming the URL and the last error. Missing objects (404), refused access (403) and
  a TLS certificate that does not verify (see ``data.remote_ca_file``: a private CA's bundle) are not retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, TypeVar, Union

import aiohttp
import fsspec
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import SSLError as BotoSSLError
from fsspec.exceptions import FSTimeoutError

from largelm.data.format import MANIFEST_NAME, DataError, Manifest, ShardInfo, parse_manifest
from largelm.data.format import read_manifest as read_local_manifest

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("http://", "https://", "s3://")
Location = Union[str, Path]  # a local split directory (Path) or a remote prefix (URL string)
T = TypeVar("T")


class RemoteError(DataError):
    """A remote object stayed unreachable for longer than ``RemoteSettings.timeout_s`` (or cannot be read at all)."""


@dataclass(frozen=True)
class RemoteSettings:
    timeout_s: float = 300.0  # one request failing this long (from its first failure) ends the run
    read_timeout_s: float = 60.0  # a connect or read stalled this long fails the request (then it is retried)
    backoff_s: float = 0.5  # first retry delay, doubled on every further retry of the same request
    max_backoff_s: float = 30.0
    chunk_bytes: int = 8 << 20  # one ranged GET; a retry re-requests at most this much
    cache_dir: Optional[str] = None  # keep verified shards here (by sha256) for later epochs and runs
    cache_max_bytes: int = 0  # cache size bound (least recently used shards removed first); 0: unbounded
    ca_file: Optional[str] = None  # PEM CA bundle verifying https:// and s3:// endpoints instead of the system's


def remote_settings(data_cfg) -> RemoteSettings:
    """RemoteSettings from a ``DataConfig`` (``data.remote_timeout_s`` ...)."""
    return RemoteSettings(timeout_s=data_cfg.remote_timeout_s, read_timeout_s=data_cfg.remote_read_timeout_s,
                          cache_dir=data_cfg.cache_dir, cache_max_bytes=data_cfg.cache_max_bytes,
                          ca_file=data_cfg.remote_ca_file)


def is_remote(location) -> bool:
    return isinstance(location, str) and location.startswith(REMOTE_SCHEMES)


def as_location(path) -> Location:
    """A dataset path from a config: a URL stays a string (``Path`` would fold its ``//``), anything else a Path."""
    return path if is_remote(path) else Path(path)


def join(location: Location, name: str) -> Location:
    """``name`` inside a split directory or under a remote prefix."""
    if is_remote(location):
        return location.rstrip("/") + "/" + name
    return Path(location) / name


def _check_shard_name(name: str, where: str) -> None:
    """A remote manifest names objects under its own prefix only (no other bucket/host, no ``..``, no query)."""
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or ".." in parts or any(c in name for c in ":?#\\%"):
        raise DataError(f"{where}: shard file {name!r} is not a plain name under the manifest's prefix")


# --- retries ---------------------------------------------------------------------------------------------------
_retry_lock = threading.Lock()
_retries = 0
_TRANSIENT = (OSError, aiohttp.ClientError, asyncio.TimeoutError, BotoCoreError, ClientError, FSTimeoutError)


def take_retries() -> int:
    """Retries made by this process since the last call (the loader adds them up as ``data/retries``)."""
    global _retries
    with _retry_lock:
        count, _retries = _retries, 0
    return count


def _count_retry() -> None:
    global _retries
    with _retry_lock:
        _retries += 1


def _permanent(err: BaseException) -> bool:
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, DataError)):
        return True
    status = getattr(err, "status", None)  # aiohttp.ClientResponseError: a 4xx other than timeout/throttling
    return isinstance(err, aiohttp.ClientResponseError) and status is not None and 400 <= status < 500 \
        and status not in (408, 429)


class _Cancelled(Exception):
    """A download nobody will read any more (its reader stopped)."""


def _untrusted_certificate(err: BaseException) -> bool:
    """A TLS certificate that does not verify (unknown CA, wrong host, expired): not transient, never retried."""
    if isinstance(err, BotoSSLError):  # wraps every TLS failure: a cut-off handshake stays transient
        err = err.kwargs.get("error")
    return isinstance(err, (aiohttp.ClientConnectorCertificateError, ssl.SSLCertVerificationError))


def with_retries(url: str, settings: RemoteSettings, call: Callable[[], T],
                 cancel: Optional[threading.Event] = None) -> T:
    """``call()`` until it succeeds; transient failures retried with exponential backoff for up to
    ``settings.timeout_s`` from the first failure, then ``RemoteError`` naming ``url`` and the last error.
    ``cancel``: set when the result is no longer wanted (ends the wait between retries)."""
    first_failure, attempt = None, 0
    while True:
        try:
            return call()
        except _TRANSIENT as err:
            if _untrusted_certificate(err):
                raise RemoteError(
                    f"{url}: TLS certificate verification failed ({type(err).__name__}: {err}); if a private CA "
                    "signed the server's certificate, set data.remote_ca_file to that CA's PEM file") from None
            if _permanent(err):
                raise
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            waited = now - first_failure
            if waited >= settings.timeout_s:
                raise RemoteError(
                    f"{url}: unreachable for {waited:.1f}s after {attempt} retries (data.remote_timeout_s="
                    f"{settings.timeout_s:g}); last error: {type(err).__name__}: {err}") from None
            delay = min(settings.backoff_s * 2 ** attempt, settings.max_backoff_s, settings.timeout_s - waited)
            attempt += 1
            _count_retry()
            log.warning("%s: %s: %s; retry %d in %.2fs", url, type(err).__name__, err, attempt, delay)
            if cancel is not None and cancel.wait(delay):
                raise _Cancelled(url) from None
            if cancel is None:
                time.sleep(delay)


# --- filesystems ---------------------------------------------------------------------------------------------------
_filesystems: dict[tuple, fsspec.AbstractFileSystem] = {}


def filesystem(url: str, settings: RemoteSettings) -> fsspec.AbstractFileSystem:
    """This process's fsspec filesystem for ``url``'s scheme (a DataLoader worker makes its own after the fork)."""
    protocol = url.split("://", 1)[0]
    aws = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))  # endpoint, region, keys
    key = (os.getpid(), protocol, settings.read_timeout_s, settings.ca_file, aws)
    fs = _filesystems.get(key)
    if fs is None:
        t = settings.read_timeout_s
        tls = _tls_context(settings.ca_file) if settings.ca_file else None  # a bad CA file fails here, named
        if protocol == "s3":
            # retries=1 / max_attempts=1: one attempt per call, with_retries does the rest (and counts it)
            client = {"verify": settings.ca_file} if settings.ca_file else {}
            fs = fsspec.filesystem("s3", skip_instance_cache=True, client_kwargs=client, config_kwargs={
                "connect_timeout": t, "read_timeout": t, "retries": {"total_max_attempts": 1, "mode": "standard"}})
            fs.retries = 1  # s3fs's own retry loop (a class attribute, no constructor argument)
        else:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)
            request = {"ssl": tls} if tls is not None else {}  # fsspec passes these to every aiohttp request
            fs = fsspec.filesystem(protocol, skip_instance_cache=True, client_kwargs={"timeout": timeout}, **request)
        _filesystems[key] = fs
    return fs


def _tls_context(ca_file: str) -> ssl.SSLContext:
    """Verifying TLS context trusting the CA certificates in ``ca_file`` (only those, as AWS_CA_BUNDLE does)."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except OSError as err:  # missing file, or no PEM certificate in it (ssl.SSLError is an OSError)
        raise DataError(f"data.remote_ca_file {ca_file}: cannot be used as a CA bundle: {err}") from None
    context.set_alpn_protocols(("http/1.1",))  # as aiohttp's own default context
    return context


def read_range(url: str, settings: RemoteSettings, start: Optional[int] = None, end: Optional[int] = None,
               cancel: Optional[threading.Event] = None) -> bytes:
    """Bytes ``[start, end)`` of ``url`` (the whole object without limits), retried; a short body is retried too."""
    fs = filesystem(url, settings)

    def call() -> bytes:
        data = fs.cat_file(url, start=start, end=end)
        if end is not None and len(data) != end - (start or 0):
            want = end - (start or 0)
            if len(data) > want:  # a server that ignores Range sends the whole object
                raise DataError(f"{url}: asked for bytes {start}-{end - 1} and got {len(data)} bytes: the server "
                                "does not honour HTTP Range requests, which remote shards need")
            raise OSError(f"short read: {len(data)} of {want} bytes at offset {start}")
        return data

    return with_retries(url, settings, call, cancel)


def read_manifest(location: Location, settings: Optional[RemoteSettings] = None) -> Manifest:
    """The manifest of a local split directory or of a remote prefix (fetched and validated the same way)."""
    if not is_remote(location):
        return read_local_manifest(location)
    settings = settings or RemoteSettings()
    url = join(location, MANIFEST_NAME)
    try:
        raw = read_range(url, settings)
    except FileNotFoundError:
        raise DataError(f"{url}: no manifest (is {location} a prefix written by largelm-prepare-data?)") from None
    except PermissionError as err:
        raise DataError(f"{url}: access refused: {err}") from None
    manifest = parse_manifest(raw, url)
    for info in manifest.shards:
        _check_shard_name(info.file, url)
    return manifest


def check_remote_shards(manifest: Manifest, location: str, settings: RemoteSettings) -> None:
    """Every shard exists and has the manifest's size (one HEAD/stat each, 16 at a time)."""
    fs = filesystem(location, settings)

    def size(info: ShardInfo) -> tuple[str, Optional[int]]:
        url = join(location, info.file)
        try:
            return url, with_retries(url, settings, lambda: fs.info(url).get("size"))
        except FileNotFoundError:
            raise DataError(f"shard {url} listed in {join(location, MANIFEST_NAME)} is missing") from None

    with ThreadPoolExecutor(16) as pool:
        found = list(pool.map(size, manifest.shards))
    for info, (url, actual) in zip(manifest.shards, found):
        if actual is not None and actual != info.num_bytes:
            raise DataError(f"shard {url} is {actual} bytes but the manifest says {info.num_bytes} (truncated or "
                            "replaced?)")


# --- shard downloads -----------------------------------------------------------------------------------------------
class ShardFetcher:
    """Downloads whole shards in the background (this one and the next of a reader's share), each into a file
    opened for reading, together with the sha256 of its bytes. One per ``ShardReader``; threads made per process."""

    def __init__(self, settings: RemoteSettings):
        self.settings = settings
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pid: Optional[int] = None

    def start(self, url: str, info: ShardInfo) -> Future:
        if self._pid != os.getpid():  # first use in this process (a forked worker has no threads of its parent)
            self._pool, self._pid = ThreadPoolExecutor(2, thread_name_prefix="shard-fetch"), os.getpid()
        cancel = threading.Event()
        future = self._pool.submit(self._fetch, url, info, cancel)
        future.cancel_event = cancel
        return future

    @staticmethod
    def discard(future: Future) -> None:
        """A download nobody will read (the reader stopped early): stop it (waits for the request in flight, at
        most ``read_timeout_s``; its partial file is removed), or close its file."""
        future.cancel_event.set()
        if future.cancel():
            return
        try:
            future.result()[0].close()
        except BaseException:  # noqa: BLE001 - cancelled or failed: nothing was left open
            pass

    def _fetch(self, url: str, info: ShardInfo, cancel: threading.Event):
        cache = self.settings.cache_dir
        if cache:
            hit = _cache_lookup(Path(cache), info)
            if hit is not None:
                return hit, info.sha256
        out = tempfile.NamedTemporaryFile(dir=cache, prefix=".partial-", delete=False) if cache else \
            tempfile.TemporaryFile()
        try:
            digest, offset, chunk = hashlib.sha256(), 0, self.settings.chunk_bytes
            while offset < info.num_bytes:
                if cancel.is_set():
                    raise _Cancelled(url)
                end = min(offset + chunk, info.num_bytes)
                # retried at this offset: nothing lost or doubled
                data = read_range(url, self.settings, offset, end, cancel)
                digest.update(data)
                out.write(data)
                offset = end
            out.flush()
            actual = digest.hexdigest()
            if cache and actual == info.sha256:  # only verified bytes enter the cache
                out.close()
                return _cache_store(Path(cache), Path(out.name), info, self.settings.cache_max_bytes), actual
            if cache:  # mismatching bytes stay out of the cache (the open file is still read, in skip mode)
                os.unlink(out.name)
            out.seek(0)
            return out, actual
        except BaseException:
            out.close()
            if cache and os.path.exists(out.name):
                os.unlink(out.name)
            raise


def _cache_path(cache: Path, info: ShardInfo) -> Path:
    return cache / f"{info.sha256}.tar"  # by content: another run, split or URL with the same bytes shares it


def _cache_lookup(cache: Path, info: ShardInfo):
    """An open, verified cached copy of the shard, or None (a damaged copy is removed and fetched again)."""
    path = _cache_path(cache, info)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return None
    digest = hashlib.sha256()
    while block := fh.read(1 << 20):
        digest.update(block)
    if digest.hexdigest() != info.sha256:
        fh.close()
        log.warning("cache file %s does not match its sha256; fetching the shard again", path)
        path.unlink(missing_ok=True)
        return None
    os.utime(path)  # recently used: evicted last
    fh.seek(0)
    return fh


def _cache_store(cache: Path, partial: Path, info: ShardInfo, max_bytes: int):
    """Move a verified download into the cache (atomic rename: other workers see a whole file or none), open it,
    then evict least recently used files past ``max_bytes`` (an open file stays readable when removed)."""
    path = _cache_path(cache, info)
    os.replace(partial, path)
    fh = open(path, "rb")
    if max_bytes > 0:
        files = []
        for p in cache.glob("*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:  # removed by another worker meanwhile
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= max_bytes:
                break
            if p != path:
                p.unlink(missing_ok=True)
                total -= size
    return fh


# --- upload (largelm-prepare-data --out s3://...) -------------------------------------------------------------------
def remote_split_exists(url: str, overwrite: bool, settings: Optional[RemoteSettings] = None) -> bool:
    """Whether ``url`` holds a manifest; a DataError when it does and ``overwrite`` is off."""
    settings = settings or RemoteSettings()
    if not url.startswith("s3://"):
        raise DataError(f"{url}: data can be written to s3:// prefixes only (http(s) is read-only here)")
    fs, manifest_url = filesystem(url, settings), join(url, MANIFEST_NAME)
    found = with_retries(manifest_url, settings, lambda: fs.exists(manifest_url))
    if found and not overwrite:
        raise DataError(f"{url} already holds prepared data ({MANIFEST_NAME}); pass --overwrite to replace it")
    return found


def upload_split(local_dir: Path, url: str, overwrite: bool, settings: Optional[RemoteSettings] = None) -> None:
    """Upload a prepared split directory: an old manifest removed first, then every shard, the manifest last, so
    a reader never sees a manifest naming shards that are not (all) there, or not these."""
    settings = settings or RemoteSettings()
    fs = filesystem(url, settings)
    manifest_url = join(url, MANIFEST_NAME)
    if remote_split_exists(url, overwrite, settings):
        with_retries(manifest_url, settings, lambda: fs.rm_file(manifest_url))
    shards = sorted(p for p in Path(local_dir).iterdir() if p.name != MANIFEST_NAME)
    for path in [*shards, Path(local_dir) / MANIFEST_NAME]:
        target = join(url, path.name)
        with_retries(target, settings, lambda p=path, t=target: fs.put_file(str(p), t))

"""File helpers shared by the data and checkpoint code: content hashes and atomic writes."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def publish_dir(partial: str | Path, final: str | Path, replaced: str | Path) -> None:
    """Make the complete, written directory ``partial`` appear as ``final`` in one rename.

    An existing ``final`` (a complete earlier copy) is moved aside to ``replaced`` only at that moment and removed
    once the new one is in place; if the renames fail it is put back. Readers see the old directory or the new
    one, never a mix. ``partial``'s files must already be fsynced (its directory entry is fsynced here).
    """
    partial, final, replaced = Path(partial), Path(final), Path(replaced)
    fsync_dir(partial)
    try:
        if final.exists():
            os.rename(final, replaced)
        os.rename(partial, final)
        fsync_dir(final.parent)
    except OSError:
        if replaced.exists() and not final.exists():
            os.rename(replaced, final)
        raise
    shutil.rmtree(replaced, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see either the old or the new content, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def torch_save_durable(obj, path: str | Path, zipfile: bool = True) -> None:
    """``torch.save`` to ``path``, fsynced; a failed write raises the ``OSError`` with its errno.

    torch reports a failed write (a full disk: ``ENOSPC``) only as "RuntimeError: ... unexpected pos"; writing
    through ``_WriteAll`` keeps the real ``OSError`` and raises it instead. The fsync makes the bytes durable
    before a manifest that vouches for them is written.
    """
    import torch

    writer = None
    try:
        with open(path, "wb", buffering=0) as fh:
            writer = _WriteAll(fh)
            torch.save(obj, writer, _use_new_zipfile_serialization=zipfile)
            os.fsync(fh.fileno())
    except (OSError, RuntimeError) as err:
        real = writer.error if writer is not None and writer.error is not None else err
        if isinstance(real, OSError):  # name the file: "[Errno 28] No space left on device (writing ...)"
            raise OSError(real.errno, f"{real.strerror or real} (writing {path})") from None
        raise


class _WriteAll:
    """File-like ``write`` over a raw file: loops over short writes (a raw write of > 2 GiB returns early on
    Linux) and keeps the ``OSError`` of a failed one (torch replaces it with a RuntimeError)."""

    def __init__(self, raw):
        self.raw = raw
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += self.raw.write(view[done:])
        except OSError as err:
            self.error = err
            raise
        return done

    def flush(self) -> None:
        pass

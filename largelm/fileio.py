"""File helpers shared by the data and checkpoint code: content hashes, atomic writes, bounded YAML."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path
from typing import Optional

import yaml

# A config is a few hundred values. YAML anchors/aliases let a few hundred bytes describe 10^9 of them (each
# alias is a reference, so loading is cheap, but validating or printing the tree walks every expansion: a
# 396-byte "billion laughs" config took 10 s and a 312 MB error message). Trees larger than this are refused.
MAX_YAML_VALUES = 100_000


class YAMLError(ValueError):
    """Text that is not valid YAML, or whose aliases expand beyond ``MAX_YAML_VALUES`` values."""


def _expanded_size(value, limit: int) -> int:
    """How many values ``value`` holds once every alias is expanded (memoised per shared node; stops past limit)."""
    memo: dict[int, int] = {}

    def size(v) -> int:
        if not isinstance(v, (dict, list)):
            return 1
        if id(v) in memo:
            return memo[id(v)]
        memo[id(v)] = limit + 1  # a node that reaches itself (recursive alias) expands without end
        items = list(v.keys()) + list(v.values()) if isinstance(v, dict) else v
        total = 1
        for item in items:
            total += size(item)
            if total > limit:
                break
        memo[id(v)] = total
        return total

    return size(value)


def parse_yaml(text: str, source: str):
    """``yaml.safe_load`` (plain data only, no Python objects) that refuses alias bombs; errors name ``source``."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise YAMLError(f"{source} is not valid YAML: {err}") from None
    if _expanded_size(value, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise YAMLError(f"{source}: its anchors/aliases expand to more than {MAX_YAML_VALUES:,} values (a YAML alias "
                        "bomb?); a config holds a few hundred")
    return value


def read_yaml(path: str | Path):
    """``parse_yaml`` of a file's text."""
    return parse_yaml(Path(path).read_text(), str(path))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def confined_path(root: str | Path, name: str, where: str, error: type[Exception] = ValueError) -> Path:
    """``root / name`` for a ``name`` read from a file the user did not write (a manifest, ``largelm.json``, an HF
    index): a relative path that stays inside ``root`` (no absolute path, no ``..``, no symlink leading out), else
    ``error`` naming ``where`` - a crafted file must not make a tool read, hash or copy any file on the machine."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise error(f"{where}: {name!r} is not a relative path inside {root}")
    root = Path(root)
    path = root / name
    if path.exists() and not path.resolve().is_relative_to(root.resolve()):
        raise error(f"{where}: {name!r} leads outside {root} (a symlink to {path.resolve()})")
    return path


def ordinary_mode(mode: int = 0o666) -> int:
    """``mode`` as this process's umask lets ordinary new files have it (0o644 under the usual umask 022).

    Read from /proc (Linux 4.7+): setting the umask to read it would, for a moment, apply to files other threads
    create (DataLoader, checkpoint writers)."""
    try:
        status = Path("/proc/self/status").read_text()
        mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return mode & ~mask


def save_safetensors(tensors: dict, path: str | Path, metadata: Optional[dict] = None) -> None:
    """``safetensors.torch.save_file`` with the permissions of an ordinary file: safetensors creates its files
    with mode 0600, so a team sharing an export directory could read every file but the weights."""
    from safetensors.torch import save_file  # lazy (heavy: torch) - fileio is imported by light tools too

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, ordinary_mode())


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


def process_gone_here(holder: dict) -> bool:
    """Is the process a lock file names (``{"host": ..., "pid": ...}``) known to be gone: on this host, and no
    process with that pid? Another host's holder, or a record without a usable pid, may be alive (False)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False

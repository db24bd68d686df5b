"""largelm.fileio: the atomic writes the checkpoints, the converter and the quantized exports share."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from largelm.fileio import process_gone_here, publish_dir, write_text_atomic


def _dir(path, **files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_publish_dir_swaps_a_whole_directory(tmp_path):
    final, replaced = _dir(tmp_path / "out", a="old", stale="only in the old copy"), tmp_path / ".replaced-out"
    publish_dir(_dir(tmp_path / ".partial-out", a="new"), final, replaced)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or replaced copy left
    assert sorted(p.name for p in final.iterdir()) == ["a"] and (final / "a").read_text() == "new"
    publish_dir(_dir(tmp_path / ".partial-new", b="first"), tmp_path / "new", tmp_path / ".replaced-new")
    assert (tmp_path / "new" / "b").read_text() == "first"


def test_publish_dir_puts_the_previous_directory_back_when_the_rename_fails(tmp_path, monkeypatch):
    import largelm.fileio as fileio

    final, partial = _dir(tmp_path / "out", a="old"), _dir(tmp_path / ".partial-out", a="new")
    real_rename = fileio.os.rename

    def rename(src, dst):  # the second rename (new copy into place) fails, as on a full or failing disk
        if str(src) == str(partial):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(fileio.os, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        publish_dir(partial, final, tmp_path / ".replaced-out")
    assert (final / "a").read_text() == "old" and not (tmp_path / ".replaced-out").exists()
    assert (partial / "a").read_text() == "new"  # the caller removes its partial copy


def test_write_text_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "latest"
    write_text_atomic(target, "step_1")
    write_text_atomic(target, "step_2")
    assert target.read_text() == "step_2" and [p.name for p in tmp_path.iterdir()] == ["latest"]


@pytest.mark.parametrize("text, what", [
    ("[1, 2]", "not an object with a 'files' mapping"),
    ('{"step": 3}', "not an object with a 'files' mapping"),
    ('{"files": {"model.pt": 12}}', "files\\['model.pt'\\] lacks an integer 'bytes'"),
    ('{"files": {"model.pt": {"bytes": "12", "sha256": "ab"}}}', "files\\['model.pt'\\] lacks an integer 'bytes'"),
])
def test_a_checkpoint_manifest_of_the_wrong_shape_is_named_corrupt(tmp_path, text, what):
    """Valid JSON that is not a manifest must be a CheckpointError (resume falls back past it), not a TypeError."""
    from largelm.checkpoint.manager import CheckpointError, find_latest, verify_checkpoint

    ckpt = tmp_path / "step_00000003"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"manifest \S+manifest.json is corrupt: {what}"):
        verify_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*\n.*is corrupt"):
        find_latest(tmp_path)


def test_process_gone_here_only_for_a_dead_pid_of_this_host():
    here = socket.gethostname()
    ended = subprocess.Popen(["true"])
    ended.wait()  # reaped: its pid names no process (until reused, which a fresh pid is not this soon)
    assert process_gone_here({"host": here, "pid": ended.pid})
    assert not process_gone_here({"host": here, "pid": os.getpid()})
    assert not process_gone_here({"host": here + "-other", "pid": ended.pid})  # another host's: may be alive
    assert not process_gone_here({"host": here, "pid": "12"}) and not process_gone_here({"host": here})

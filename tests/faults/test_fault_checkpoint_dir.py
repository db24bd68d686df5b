"""A checkpoint directory is not always what the run left there: a user rolled ``latest`` back, a stray file sits
next to the checkpoints, another timeline's checkpoints are newer than the one resumed. Nothing the run just wrote
is deleted, nothing is silently resumed from another timeline, and a stray name does not fail a save."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from faultkit import single_rank_step

from largelm.checkpoint.info import inspect_checkpoint
from largelm.checkpoint.manager import ABANDONED_PREFIX, LATEST, CheckpointManager, find_latest, set_aside_newer
from largelm.checkpoint.reader import consolidate_checkpoint
from largelm.config import dump_config
from largelm.fileio import sha256_file


@pytest.fixture(scope="module")
def engine_run(run_config, tmp_path_factory):
    """One real DeepSpeed engine (1 rank, in process) shared by the cases: saving is what they exercise."""
    with single_rank_step(run_config, tmp_path_factory.mktemp("run")) as (cfg, step):
        yield cfg, step


@pytest.fixture
def engine_step(engine_run):
    return engine_run[1]


def _save(manager: CheckpointManager, step, n: int):
    return manager.save(step.engine, n, {"step": n, "rng": torch.get_rng_state()})


def _saved(step, root, keep_last: int, steps) -> CheckpointManager:
    """A manager of ``root`` that has saved ``steps`` in order."""
    manager = CheckpointManager(root, keep_last=keep_last)
    for n in steps:
        _save(manager, step, n)
    return manager


def _steps(root) -> list[int]:
    return [int(p.name.split("_")[1]) for p in sorted(root.glob("step_*"))]


def test_rollback_then_save_keeps_the_new_checkpoint_and_sets_the_other_timeline_aside(engine_step, tmp_path, ledger,
                                                                                      caplog):
    root = tmp_path / "ckpt"
    _saved(engine_step, root, 3, (100, 300, 400))  # 300 and 400 belong to a timeline the user abandons
    manager = CheckpointManager(root, keep_last=2)
    with ledger.scenario("rollback: latest pointed at an older step, then a save with keep_last=2"):
        (root / LATEST).write_text("step_00000100")
        resumed = find_latest(root)
        assert resumed.step == 100
        with caplog.at_level(logging.WARNING, logger="largelm.checkpoint.manager"):
            aside = set_aside_newer(root, resumed)  # what the trainer does on resume, before its first save
        assert aside.name.startswith(ABANDONED_PREFIX) and sorted(p.name for p in aside.iterdir()) == [
            "step_00000300", "step_00000400"]
        assert "moved to" in caplog.text and "step_00000400" in caplog.text
        saved = _save(manager, engine_step, 200)
        assert saved.is_dir() and _steps(root) == [100, 200]  # the save survives its own rotation
        assert find_latest(root).step == 200  # the next resume continues this timeline, not step 400


def test_rotation_never_deletes_the_checkpoint_just_written(engine_step, tmp_path, ledger, caplog):
    """Without a resume (``checkpoint.resume: false`` in a used directory) later steps exist: they are named, kept."""
    root = tmp_path / "ckpt"
    _saved(engine_step, root, 1, (300, 400))
    with ledger.scenario("save below existing later steps with keep_last=1"):
        with caplog.at_level(logging.WARNING, logger="largelm.checkpoint.manager"):
            saved = _save(CheckpointManager(root, keep_last=1), engine_step, 2)
        assert saved.is_dir() and 2 in _steps(root)
        assert "later steps than the one just saved (step 2)" in caplog.text


def test_latest_naming_a_missing_checkpoint_is_a_warning_naming_both(engine_step, tmp_path, ledger, caplog):
    root = tmp_path / "ckpt"
    _saved(engine_step, root, 3, (2, 4))
    with ledger.scenario("latest names a checkpoint that does not exist"):
        (root / LATEST).write_text("step_00000006")
        with caplog.at_level(logging.WARNING, logger="largelm.checkpoint.manager"):
            assert find_latest(root).step == 4
        assert "names step_00000006, which is not a complete checkpoint" in caplog.text
        assert "(step_00000004)" in caplog.text


def test_stray_partial_named_file_does_not_fail_a_save(engine_step, tmp_path, ledger):
    root = tmp_path / "ckpt"
    root.mkdir()
    notes = root / ".partial-notes.txt"
    notes.write_text("my notes")
    (root / ".partial-scratch").mkdir()
    with ledger.scenario("stray .partial-notes.txt and .partial-scratch/ in the checkpoint directory"):
        saved = _save(CheckpointManager(root, keep_last=2), engine_step, 2)
        assert saved.is_dir() and notes.read_text() == "my notes" and (root / ".partial-scratch").is_dir()


def test_checkpoint_config_naming_another_file_as_tokenizer_is_not_copied(engine_run, tmp_path, ledger):
    """A checkpoint from elsewhere: its config.yaml names ~/.ssh/id_rsa as tokenizer.model. The converter used to
    copy that file into its output as tokenizer.model; it is used only when it matches the manifest's sha256."""
    cfg, step = engine_run
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    notes: list[str] = []
    with ledger.scenario("checkpoint config naming a private file as its tokenizer (converter output)"):
        for name, tokenizer in (("honest", cfg.tokenizer.model), ("hostile", str(secret))):
            hostile = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"model": tokenizer})})
            manager = CheckpointManager(tmp_path / name, keep_last=1, config_yaml=dump_config(hostile),
                                        meta={"world_size": 1, "tensor_parallel": 1, "pipeline_parallel": 1,
                                              "zero_stage": cfg.parallel.zero_stage, "precision": "fp32",
                                              "tokenizer_sha256": sha256_file(cfg.tokenizer.model)})
            saved = _save(manager, step, 2)
            result = consolidate_checkpoint(inspect_checkpoint(saved), log=notes.append)
            assert result.tokenizer == (Path(cfg.tokenizer.model) if name == "honest" else None)
        assert f"and {secret} does not match it; the result has no tokenizer" in notes[-1]

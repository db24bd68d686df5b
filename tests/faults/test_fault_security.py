"""Untrusted inputs must not run code: checkpoints are unpickled weights-only (DeepSpeed's own files included),
shards are read with ``allow_pickle=False``, configs with YAML's safe loader. Each test plants a payload whose
unpickling would create a marker file, checks that the payload is live (an unsafe load does create it), and that
the real loaders refuse it with a clear error and the marker never appears."""

from __future__ import annotations

import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from faultkit import CodeExecutionPayload, rewrite_sample, single_rank_step

from largelm.checkpoint.manager import Checkpoint, CheckpointError, CheckpointManager, find_latest, verify_checkpoint
from largelm.config import ConfigError, load_config
from largelm.data import DataError, build_loader
from largelm.fileio import sha256_file
from largelm.parallel.deepspeed_compat import forced_weights_only


def _poison(path, marker) -> None:
    """Replace a checkpoint file by a code-executing pickle and fix the manifest (an attacker controls both)."""
    torch.save({"module": CodeExecutionPayload(marker), "step": 1}, path)
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest_path.write_text(json.dumps(manifest))


def test_crafted_checkpoint_files_are_refused(run_config, tmp_path, ledger):
    # The payload is live: an unsafe load executes it.
    control = tmp_path / "control.pt"
    torch.save(CodeExecutionPayload(tmp_path / "control-marker"), control)
    torch.load(control, weights_only=False)
    assert (tmp_path / "control-marker").exists()

    # as_configured: keep the ZeRO partition file on one rank (deepspeed_config.engine_zero_stage)
    with single_rank_step(run_config, tmp_path / "run", parallel={"single_replica_zero": "as_configured"}) as (cfg,
                                                                                                           step):
        manager = CheckpointManager(tmp_path / "ckpt", keep_last=3)
        good = manager.save(step.engine, 1, {"step": 1, "rng": torch.get_rng_state()})
        assert manager.load(step.engine, Checkpoint(good, 1))["step"] == 1  # a clean checkpoint loads
        files = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "trainer_state_rank00000.pt"]
        for i, name in enumerate(files):
            with ledger.scenario(f"code-executing pickle in checkpoint file {name}"):
                root = tmp_path / f"evil{i}"
                shutil.copytree(good, root / good.name)
                (root / "latest").write_text(good.name)
                marker = tmp_path / f"marker{i}"
                _poison(root / good.name / name, marker)
                candidate = find_latest(root)  # checksums pass: they cannot tell an attacker from a writer
                verify_checkpoint(candidate.path)
                with pytest.raises(CheckpointError, match=rf"refused to (load|unpickle).*{name}|{name}.*refused"):
                    CheckpointManager(root).load(step.engine, candidate)
                assert not marker.exists()

    with ledger.scenario("torch.load(weights_only=False) inside DeepSpeed while loading is forced weights-only"):
        marker = tmp_path / "marker-forced"
        torch.save(CodeExecutionPayload(marker), tmp_path / "direct.pt")
        with forced_weights_only(), pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / "direct.pt", weights_only=False)  # what DeepSpeed's universal loader calls
        assert not marker.exists()


def test_pickled_sample_in_a_shard_is_refused(make_token_shards, tmp_path, ledger):
    split = make_token_shards(tmp_path / "split", 20)
    marker = tmp_path / "marker"
    buf = io.BytesIO()
    np.save(buf, np.array([CodeExecutionPayload(marker)], dtype=object), allow_pickle=True)
    with ledger.scenario("code-executing pickle (object .npy) as a sample in a tar shard"):
        key = rewrite_sample(split / "train-000001.tar", 2, buf.getvalue())
        with pytest.raises(DataError, match=rf"train-000001\.tar sample '{key}': tokens\.npy is not a readable "
                                            r"\.npy array: Object arrays cannot be loaded when allow_pickle=False"):
            list(build_loader([split], 8, 4, num_workers=0, infinite=False))
        loader = build_loader([split], 8, 4, num_workers=0, infinite=False, skip_bad_samples=True)
        assert sum(len(b["key"]) for b in loader) == 19 and loader.bad_samples == 1
        assert not marker.exists()


def test_yaml_config_cannot_construct_python_objects(tmp_path, ledger):
    marker = tmp_path / "marker"
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with ledger.scenario("YAML config with a !!python/object/apply tag"):
        with pytest.raises(ConfigError, match=r"evil\.yaml is not valid YAML: could not determine a constructor"):
            load_config(config)
        assert not marker.exists()

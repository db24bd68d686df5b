"""Config and launch faults are refused before any process group starts or any step runs, naming what is wrong:
by the launcher (``largelm-launch``, which then starts nothing) and by each rank's entry point (which runs the
same preflight when started by another launcher)."""

from __future__ import annotations

import re

import pytest
import yaml

from faultkit import edit_config
from largelm import launch
from largelm.train import main as rank_main


def _refused(capsys, config, nproc=2, *overrides) -> str:
    code = launch.main(["--config", str(config), "--nproc", str(nproc), "--", *overrides])
    out = capsys.readouterr()
    assert code == 2, out
    assert "deepspeed.launcher" not in out.out + out.err  # no process was started
    return out.err


def _set(config, section, key, value):
    data = yaml.safe_load(config.read_text())
    data[section][key] = value
    config.write_text(yaml.safe_dump(data))
    return config


CASES = {
    "unknown field": (lambda c: _set(c, "train", "stepz", 5), 2, r"train\.stepz: unknown field"),
    "wrong type": (lambda c: _set(c, "train", "steps", "many"), 2,
                   r"train\.steps: Input should be a valid integer.*got 'many'"),
    "impossible value": (lambda c: _set(c, "optimizer", "min_lr", 1.0), 2,
                         r"optimizer\.min_lr=1\.0 is larger than optimizer\.lr"),
    "world size not matching the layout": (lambda c: _set(c, "parallel", "tensor_parallel", 2), 3,
                                           r"world size 3 is not divisible by parallel\.tensor_parallel x "
                                           r"parallel\.pipeline_parallel = 2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_is_refused_before_launch(case, run_config, tmp_path, capsys, ledger):
    change, nproc, message = CASES[case]
    with ledger.scenario(f"config fault: {case}"):
        config = change(run_config(tmp_path))
        assert re.search(message, _refused(capsys, config, nproc)), message


@pytest.mark.slow
def test_checkpoint_of_another_shape_or_layout_is_refused(reference_fp32, run_config, copy_checkpoints, tmp_path,
                                                          capsys, ledger, monkeypatch):
    root = copy_checkpoints(reference_fp32["ckpt"], tmp_path / "ckpt")
    config = run_config(tmp_path)  # checkpoint.dir is tmp_path/ckpt: the copy of a 2-rank ZeRO-2 run
    with ledger.scenario("checkpoint from a different model shape (hidden size, layers)"):
        err = _refused(capsys, config, 2, "model.hidden_size=128", "model.num_layers=4")
        assert f"checkpoint {root / 'step_00000008'} does not match this config" in err
        assert "model.num_layers: checkpoint 2 vs config 4" in err
        assert "model.hidden_size: checkpoint 64 vs config 128" in err
    with ledger.scenario("checkpoint from a different world size / ZeRO stage"):
        err = _refused(capsys, config, 1, "parallel.zero_stage=1")
        assert "world size: checkpoint written by 2 ranks, this run has 1" in err
        assert "parallel.zero_stage: checkpoint 2 vs config 1" in err
    with ledger.scenario("checkpoint shape mismatch caught by a rank started without largelm-launch"):
        edit_config(config, model={"hidden_size": 128})
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        assert rank_main.main(["--config", str(config)]) == 2
        assert "model.hidden_size: checkpoint 64 vs config 128" in capsys.readouterr().err

"""W&B logging (``logging.wandb``, largelm/train/wandb_log.py): the config section, the logger's real offline W&B
runs read back from their transaction logs (tests/wandb_records.py) against tensorboard, and a real 2-rank
training run. Everything offline: nothing is sent anywhere (wandb_records.offline_env)."""

from __future__ import annotations

import math

import pytest
import yaml
from faults.faultkit import tb_scalars
from train_utils import check_ok, config_object, launch, tiny_config
from wandb_records import (
    STEP_METRIC,
    offline_env,
    offline_runs,
    scalar_differences,
    scalars,
)

from largelm.config import ConfigError, config_from_dict, dump_config, load_config
from largelm.train.logger import RunLogger
from largelm.train.wandb_log import RUN_ID_FILE, WandbMirror, run_id


def _wandb_config(tmp, **wandb):
    return config_object(checkpoint={"dir": str(tmp / "ckpt")},
                         logging={"wandb": {"project": "largelm-test", "mode": "offline", "dir": str(tmp / "wb"),
                                            **wandb}})


# --- config ---------------------------------------------------------------------------------------------------
def test_wandb_section_defaults_and_absence():
    assert config_object().logging.wandb is None  # absent: no W&B
    w = config_object(logging={"wandb": {"project": "p"}}).logging.wandb
    assert (w.project, w.entity, w.name, w.mode, w.dir) == ("p", None, None, "online", None)


def test_wandb_section_from_command_line_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config_object()))
    w = load_config(path, ["logging.wandb.project=largelm", "logging.wandb.mode=offline"]).logging.wandb
    assert (w.project, w.mode) == ("largelm", "offline")


@pytest.mark.parametrize("wandb,named", [
    ({}, "logging.wandb.project"),  # required
    ({"project": "p", "mode": "shared"}, "logging.wandb.mode"),
    ({"project": "a/b"}, "logging.wandb.project"),
    ({"project": "p", "entity": "team:x"}, "logging.wandb.entity"),
    ({"project": "p", "init_timeout_s": 0}, "logging.wandb.init_timeout_s"),
    ({"project": "p", "projcet": "q"}, "logging.wandb.projcet"),
])
def test_wandb_section_errors_name_the_field(wandb, named):
    raw = {"model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 16},
           "tokenizer": {"model": "t.model"}, "data": {"train": [{"path": "d"}]},
           "train": {"steps": 4, "micro_batch_size": 2}, "logging": {"wandb": wandb}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, source="run.yaml")
    assert named in str(info.value) and "run.yaml" in str(info.value)


# --- run id ---------------------------------------------------------------------------------------------------
def test_run_id_is_kept_for_resumes_and_renewed_for_fresh_starts(tmp_path):
    first = run_id(tmp_path / "ckpt", resumed=False)
    assert (tmp_path / "ckpt" / RUN_ID_FILE).read_text().strip() == first
    assert run_id(tmp_path / "ckpt", resumed=True) == first
    fresh = run_id(tmp_path / "ckpt", resumed=False)  # a new training timeline: a new W&B run
    assert fresh != first and run_id(tmp_path / "ckpt", resumed=True) == fresh
    (tmp_path / "ckpt" / RUN_ID_FILE).write_text("not/an id\n")
    renewed = run_id(tmp_path / "ckpt", resumed=True)
    assert renewed not in (first, fresh) and (tmp_path / "ckpt" / RUN_ID_FILE).read_text().strip() == renewed


# --- the logger with real offline W&B runs -------------------------------------------------------------------
def _log(logger: RunLogger, steps, eval_every: int = 2) -> None:
    for step in steps:
        logger.scalars(step, {"train/loss": 1.0 / step + 1e-9 * step, "train/grad_norm": float("nan") if step == 3
                              else 0.1 * step, "train/lr": 3e-4 * step})
        if step % eval_every == 0:  # a second call at the same step, as the trainer's validation
            logger.scalars(step, {"valid/loss": 2.0 / step, "valid/ppl": math.exp(2.0 / step)})


def test_logger_mirrors_tensorboard_and_a_resume_continues_the_run(wandb_env):
    tmp = wandb_env
    cfg = _wandb_config(tmp)
    first = RunLogger(True, 6, 0, str(tmp / "tb"), progress_bar=False, wandb=WandbMirror(cfg, resumed=False))
    _log(first, range(1, 5))
    first.close()
    # resumed from an older checkpoint (step 2) than the last logged step (4): steps 3-4 are logged again
    second = RunLogger(True, 6, 2, str(tmp / "tb"), progress_bar=False, wandb=WandbMirror(cfg, resumed=True))
    _log(second, range(3, 7))
    second.close()

    runs = offline_runs(tmp / "wb")
    stored = (tmp / "ckpt" / RUN_ID_FILE).read_text().strip()
    assert [r.id for r in runs] == [stored, stored] and [r.exit_code for r in runs] == [0, 0]
    assert [row[STEP_METRIC] for row in runs[1].history] == [3, 4, 4, 5, 6, 6]  # nothing refused or reordered
    expected = cfg.model_dump(mode="json")
    assert all({k: v for k, v in r.config.items() if not k.startswith("_")} == expected for r in runs)
    tb = tb_scalars(tmp / "tb")
    assert scalar_differences(scalars(runs), tb) == []
    up_to_4 = {tag: {s: v for s, v in by_step.items() if s <= 4} for tag, by_step in tb.items()}
    assert scalar_differences(scalars(runs[:1]), up_to_4) == []  # the first run is complete too


def test_disabled_mode_starts_no_run(wandb_env):
    tmp = wandb_env
    disabled = WandbMirror(_wandb_config(tmp, mode="disabled"), resumed=False)
    disabled.log(1, {"train/loss": 1.0})
    disabled.close()
    assert disabled.run is None and not (tmp / "ckpt" / RUN_ID_FILE).exists() and not (tmp / "wb").exists()


# --- a real training run -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_run_logs_tensorboard_scalars_to_wandb(tmp_path, tokenizer_path, shard_dir, shard_seq_length):
    """2 ranks, 4 steps, validation at steps 2 and 4: one W&B run (rank 0's) holding exactly tensorboard's scalars
    and the run's resolved config (the checkpoint's config.yaml)."""
    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length,
                         train={"steps": 4, "eval_interval": 2}, checkpoint={"save_interval": 2},
                         logging={"wandb": {"project": "largelm-test", "mode": "offline", "dir": str(tmp_path / "wb")}})
    out = check_ok(launch(config, nproc=2, env=offline_env(tmp_path)))
    assert "warning: W&B" not in out
    runs = offline_runs(tmp_path / "wb")
    assert len(runs) == 1 and runs[0].exit_code == 0
    assert runs[0].id == (tmp_path / "ckpt" / RUN_ID_FILE).read_text().strip()
    tb = tb_scalars(tmp_path / "tb")
    assert {"train/loss", "valid/loss", "perf/tokens_per_s"} <= tb.keys()
    assert scalar_differences(scalars(runs), tb) == []
    resolved = yaml.safe_load((tmp_path / "ckpt" / "step_00000004" / "config.yaml").read_text())
    assert {k: v for k, v in runs[0].config.items() if not k.startswith("_")} == resolved

"""W&B faults (largelm/train/wandb_log.py): W&B can never stop or hang training.

* online start-up fails (no credentials / no server): a warning, the run is recorded offline instead;
* W&B fails in the middle of the run: a warning, tensorboard goes on, W&B is off for the rest of the run;
* SIGKILL of the whole job, then a resume from an older checkpoint than the last logged step: the resumed job
  continues the same W&B run (same id, ``resume="allow"``), and its steps are accepted (``train/step`` x-axis).

All offline: nothing is sent anywhere (tests/wandb_records.offline_env; the "online" test has no credentials and
points W&B at a local port nobody listens on).
"""

from __future__ import annotations

import pytest
from faultkit import edit_config, run, tb_scalars
from train_utils import config_object
from wandb_records import (
    STEP_METRIC,
    offline_runs,
    read_run,
    scalar_differences,
    scalars,
)

from largelm.checkpoint.manager import find_latest
from largelm.train.logger import RunLogger
from largelm.train.wandb_log import RUN_ID_FILE, WandbMirror


def _cfg(tmp, **wandb):
    return config_object(checkpoint={"dir": str(tmp / "ckpt")},
                         logging={"wandb": {"project": "largelm-test", "dir": str(tmp / "wb"), **wandb}})


def test_online_start_failure_is_a_warning_and_the_run_is_recorded_offline(wandb_env, monkeypatch, capsys, ledger):
    tmp = wandb_env
    with ledger.scenario("W&B online start-up fails (no credentials): warning, run recorded offline"):
        monkeypatch.delenv("WANDB_MODE")
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        monkeypatch.setenv("HOME", str(tmp / "home"))  # no ~/.netrc, no stored login
        mirror = WandbMirror(_cfg(tmp, mode="online", init_timeout_s=20), resumed=False)
        warned = capsys.readouterr().out
        assert f"warning: W&B: could not start the online run {mirror.id}" in warned, warned
        assert "recording the run offline instead" in warned
        assert mirror.run is not None and mirror.run.offline
        mirror.log(1, {"train/loss": 2.5})
        mirror.close()
        runs = offline_runs(tmp / "wb")
        assert [r.id for r in runs] == [mirror.id] and scalars(runs) == {"train/loss": {1: 2.5}}


def test_wandb_failing_mid_run_is_a_warning_and_tensorboard_goes_on(wandb_env, capsys, ledger):
    tmp = wandb_env
    with ledger.scenario("W&B fails mid-run (its run finished underneath): warning, tensorboard goes on"):
        mirror = WandbMirror(_cfg(tmp, mode="offline"), resumed=False)
        logger = RunLogger(True, 4, 0, str(tmp / "tb"), progress_bar=False, wandb=mirror)
        logger.scalars(1, {"train/loss": 3.0})
        mirror.run.finish()  # W&B's run is gone: its log() raises from here on
        logger.scalars(2, {"train/loss": 2.0})
        logger.scalars(3, {"train/loss": 1.0})
        logger.close()
        warned = capsys.readouterr().out
        assert warned.count("warning: W&B: logging step 2 failed") == 1, warned
        assert "W&B is off for the rest of this run" in warned and mirror.run is None
        assert tb_scalars(tmp / "tb") == {"train/loss": {1: 3.0, 2: 2.0, 3: 1.0}}
        assert scalars(offline_runs(tmp / "wb")) == {"train/loss": {1: 3.0}}


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_same_wandb_run(run_config, wandb_env, ledger):
    """8 steps, checkpoints every 2; SIGKILL at the line of step 6 (step 5 logged, step 6 about to be), resume
    from step 4: the resumed job logs steps 5-8 again into the same W&B run, exactly tensorboard's scalars."""
    tmp = wandb_env
    with ledger.scenario("SIGKILL with W&B on, resume from an older step than the last logged: same W&B run"):
        config = run_config(tmp, logging={"wandb": {"project": "largelm-test", "mode": "offline",
                                                     "dir": str(tmp / "wb")}})
        killed = run(config, kill_when=lambda line: line.startswith("step 6/"))
        assert killed.killed and killed.returncode == -9, killed.output[-3000:]
        stored = (tmp / "ckpt" / RUN_ID_FILE).read_text().strip()
        latest = find_latest(tmp / "ckpt")  # step 4's (step 6's if its save beat the kill)
        assert latest is not None and latest.step in (4, 6), latest

        edit_config(config, logging={"tensorboard_dir": str(tmp / "tb-resumed")})
        resumed = run(config)
        out = resumed.check_ok()
        assert resumed.resumed_at == latest.step and "warning: W&B" not in out, out[-3000:]
        dirs = sorted((tmp / "wb" / "wandb").glob("offline-run-*"))
        assert len(dirs) == 2 and all(d.name.endswith(f"-{stored}") for d in dirs), dirs  # killed + resumed
        last = read_run(dirs[-1])  # the killed run's log holds what wandb-core had flushed: not compared
        assert last.id == stored and last.exit_code == 0
        assert [row[STEP_METRIC] for row in last.history] == list(range(latest.step + 1, 9))
        tb = tb_scalars(tmp / "tb-resumed")
        assert {"train/loss", "perf/tokens_per_s"} <= tb.keys()
        differ = scalar_differences(scalars([last]), tb)
        assert not differ, differ

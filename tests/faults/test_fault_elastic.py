"""A job that lost half its ranks resumes on the ranks it has: SIGKILL of a DP=2 run after its step-2 checkpoint,
restarted on one rank. Without ``checkpoint.reshard_on_resume`` the restart is refused before any rank starts,
naming the old -> new layout and the setting; with it the run reshards the checkpoint (largelm/checkpoint/elastic.py)
and finishes, its optimizer carried: Adam's step count and the LR schedule continue from step 2 (a dropped
optimizer would restart Adam at step 0), and the final checkpoint's schedule equals the uninterrupted run's.
The data position moves too (largelm/train/data_position.py): the one rank reads only what the two had not
consumed of the epoch, as many distinct samples as its steps took - none repeated, none skipped - checked on the
layout-independent positions the checkpoints record. The moments' bit-exact transfer is
tests/test_elastic_resume.py's; losses differ from the DP=2 reference (another data split), so are not compared."""

from __future__ import annotations

import pytest
import yaml
from faultkit import edit_config, run

from largelm.checkpoint.elastic import read_reshard_source
from largelm.checkpoint.manager import find_latest
from largelm.parallel.deepspeed_compat import safe_torch_load

pytestmark = pytest.mark.slow


def test_sigkill_then_resume_on_fewer_ranks_carries_the_optimizer(reference_fp32, run_config, tmp_path, ledger):
    with ledger.scenario("SIGKILL of a DP=2 job, restarted on 1 rank (resharded resume, optimizer carried)") as sc:
        config = run_config(tmp_path)
        killed = run(config, kill_when=lambda line: line.startswith("step 3/"))
        assert killed.killed and killed.returncode == -9, killed.output[-3000:]
        latest = find_latest(tmp_path / "ckpt")
        assert latest is not None and latest.step == 2
        before = _position(tmp_path, 2)  # (rotated away by the end)

        refused = run(config, nproc=1)
        assert refused.returncode == 2, refused.output[-3000:]
        assert "was written in another parallel layout" in refused.output
        assert "TP=1 PP=1 DP=2 ZeRO-2 fp32 -> TP=1 PP=1 DP=1 ZeRO-2 (engine runs ZeRO-0) fp32" in refused.output
        assert "checkpoint.reshard_on_resume=true" in refused.output
        assert refused.steps == []

        edit_config(config, logging={"tensorboard_dir": str(tmp_path / "tb-resumed")})
        resumed = run(config, ("checkpoint.reshard_on_resume=true",), nproc=1)
        resumed.check_ok()
        assert resumed.resumed_at == 2 and resumed.steps == list(range(3, 9)), resumed.output[-3000:]
        assert "optimizer carried: fp32 master weights, Adam exp_avg/exp_avg_sq and step count" in resumed.output
        assert "data position: carried: the layout-independent position of 2 data-parallel ranks" in resumed.output
        final = read_reshard_source(tmp_path / "ckpt" / "step_00000008")
        reference = read_reshard_source(reference_fp32["ckpt"] / "step_00000008")
        lost = []
        if float(final.adam_step) != 8.0:
            lost.append(f"Adam step {float(final.adam_step)} after 8 steps")
        if final.engine_state["lr_scheduler"]["_last_lr"] != reference.engine_state["lr_scheduler"]["_last_lr"]:
            lost.append("LR schedule off the uninterrupted run's")
        cfg = yaml.safe_load(config.read_text())["train"]
        read_after = 6 * cfg["micro_batch_size"] * cfg["grad_accum_steps"]  # steps 3..8 on one rank
        fresh, repeated = _consumed_between(before, _position(tmp_path, 8))
        if fresh != read_after:
            lost.append(f"{fresh} distinct unread samples consumed by the resumed run, which read {read_after}")
        if repeated:
            lost.append(f"{repeated} samples consumed before the kill are unread again")
        sc["data_lost"] = len(lost)
        assert not lost, lost


def _position(tmp_path, step: int) -> dict:
    """The layout-independent data position (dataset 0) that rank 0 saved with checkpoint ``step``."""
    state = safe_torch_load(tmp_path / "ckpt" / f"step_{step:08d}" / "trainer_state_rank00000.pt")
    return state["data"]["global"]["position"][0]


def _unread(position: dict, epoch: int) -> set[int]:
    if epoch < position["complete_before"]:
        return set()
    ranges = dict(position["remaining"]).get(epoch, [[0, position["num_samples"]]])
    return {i for a, b in ranges for i in range(a, b)}


def _consumed_between(before: dict, after: dict) -> tuple[int, int]:
    """(positions read between the two records, positions read before that are unread again)."""
    epochs = range(before["complete_before"], after["complete_before"] + 1 + len(after["remaining"]))
    fresh = sum(len(_unread(before, e) - _unread(after, e)) for e in epochs)
    repeated = sum(len(_unread(after, e) - _unread(before, e)) for e in epochs)
    return fresh, repeated

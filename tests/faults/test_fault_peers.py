"""Dead and hung peers end the job within a bounded time, with a message and a resumable exit code
(largelm/train/watchdog.py): a killed rank (SIGKILL) is noticed through the broken connection, a frozen one
(SIGSTOP) by the survivor's progress watchdog; the relaunch resumes from the last checkpoint."""

from __future__ import annotations

import os
import signal
import time

import pytest
from faultkit import RESUMED, descendant_ranks, run

from largelm.checkpoint.manager import find_latest
from largelm.train.watchdog import EXIT_LOST_PEER


def _signal_rank_at_step(step: int, rank: int, sig: int, record: dict):
    def on_line(line: str, launcher_pid: int) -> None:
        if line.startswith(f"step {step}/") and "signalled" not in record:
            pid = descendant_ranks(launcher_pid)[rank]
            os.kill(pid, sig)  # a rank of the run this test started
            record.update(signalled=time.monotonic(), pid=pid)
    return on_line


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_lost_peer_ends_the_job_and_the_relaunch_resumes(run_config, tmp_path, ledger, how):
    # the signal follows rank 0's step-5 line through a pipe: on a loaded machine the rank may already be inside the
    # step-6 save, where checkpoint.save_timeout_s bounds the wait instead of the hang timeout (both 10 s here)
    config = run_config(tmp_path, train={"steps": 12, "hang_timeout_s": 10},
                        checkpoint={"save_interval": 2, "keep_last": 2, "save_timeout_s": 10})
    record: dict = {}
    sig = signal.SIGKILL if how == "killed" else signal.SIGSTOP
    with ledger.scenario(f"peer rank {how} (SIG{'KILL' if how == 'killed' else 'STOP'}) mid-run"):
        first = run(config, on_line=_signal_rank_at_step(5, 1, sig, record), timeout=240)
        ended_after = time.monotonic() - record["signalled"]
        assert first.returncode != 0 and ended_after < 120, (ended_after, first.output[-3000:])
        if how == "killed":  # the survivor sees the broken connection (or, blocked, its watchdog fires)
            assert "lost a peer rank" in first.output or "no progress for" in first.output, first.output[-3000:]
        else:  # a frozen peer keeps its connections: only the survivor's watchdog can tell, and it names it
            assert "error (rank 0): no progress for" in first.output, first.output[-3000:]
            assert ("train.hang_timeout_s=10" in first.output
                    or "(limit 10 s) while saving the checkpoint" in first.output), first.output[-3000:]
            assert "Thread " in first.output and "(most recent call first)" in first.output  # the stacks
        assert f"exit {EXIT_LOST_PEER}" in first.output
        resumed = run(config, timeout=240)
        resumed.check_ok()
        assert int(RESUMED.search(resumed.output).group(2)) >= 2 and resumed.steps[-1] == 12


@pytest.mark.slow
def test_peer_frozen_mid_save_ends_the_job_after_the_save_timeout(run_config, tmp_path, ledger):
    """A save is progress (the hang timeout does not apply inside), but it waits in collectives: a peer frozen
    mid-save must end the job after ``checkpoint.save_timeout_s``, not hang it; the last complete checkpoint stays
    the one a restart resumes (the frozen save never published)."""
    config = run_config(tmp_path, train={"steps": 6, "hang_timeout_s": 5},
                        checkpoint={"save_interval": 2, "keep_last": 2, "save_timeout_s": 8})
    with ledger.scenario("peer rank frozen (SIGSTOP) inside a checkpoint save: checkpoint.save_timeout_s"):
        first = run(config, faults="stop_in_save@4:rank=1", timeout=240)
        assert first.returncode != 0 and "SIGSTOP during the save of step 4" in first.output, first.output[-3000:]
        assert "error (rank 0): no progress for" in first.output, first.output[-3000:]
        assert "(limit 8 s) while saving the checkpoint of step 4" in first.output, first.output[-3000:]
        assert f"exit {EXIT_LOST_PEER}" in first.output and first.seconds_after_error < 60, first.seconds_after_error
        # the frozen save never published: a restart resumes from step 2 (as after kill_in_save, test_fault_resume.py)
        assert find_latest(tmp_path / "ckpt").step == 2

"""Two runs in one checkpoint directory (a duplicate sbatch, an overlapping requeue): the second is refused at
once, naming the holder, and the first loses nothing. A dead holder's lock is taken over; a holder on another host
is named with how to break its lock (largelm/checkpoint/lock.py)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from faultkit import run

from largelm import launch
from largelm.checkpoint.lock import LOCK_NAME, CheckpointDirLock, CheckpointLocked
from largelm.train import main as rank_main


def _refused(capsys, config, *, rank_entry: bool = False) -> str:
    if rank_entry:  # a rank's entry point started by another launcher (srun, torchrun): rank 0 takes the lock
        code = rank_main.main(["--config", str(config)])
    else:
        code = launch.main(["--config", str(config), "--nproc", "1"])
    out = capsys.readouterr()
    assert code == 2, out
    assert "--module largelm.train.main" not in out.out  # nothing was started
    return out.err


def _plant(root, **holder) -> None:
    root.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": None, "started": time.time(), **holder}
    (root / LOCK_NAME).write_text(json.dumps(record))


@pytest.mark.parametrize("rank_entry", [False, True], ids=["launcher", "rank-0"])
def test_a_second_run_on_a_held_directory_is_refused_naming_the_holder(run_config, tmp_path, capsys, ledger,
                                                                       rank_entry):
    config = run_config(tmp_path)
    refused_by = "rank 0" if rank_entry else "launcher"
    with ledger.scenario(f"second run on a checkpoint dir held by a live run (refused by the {refused_by})"):
        with CheckpointDirLock(tmp_path / "ckpt"):  # this live process is "run A"
            err = _refused(capsys, config, rank_entry=rank_entry)
            assert f"is in use by another run (host {socket.gethostname()} pid {os.getpid()}" in err
            assert f"remove {tmp_path / 'ckpt' / LOCK_NAME}" in err
            assert (tmp_path / "ckpt" / LOCK_NAME).is_file()  # run A's lock is untouched
            # nothing of the refused run is left in this process (a watchdog would end it after hang_timeout_s)
            assert not [t.name for t in threading.enumerate() if t.name.startswith("largelm-")]
        assert not (tmp_path / "ckpt" / LOCK_NAME).exists()  # and released when A ends


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, ledger, caplog):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    with ledger.scenario("lock left by a killed run on this host"):
        _plant(tmp_path, pid=dead_pid)
        with caplog.at_level(logging.WARNING, logger="largelm.checkpoint.lock"):
            with CheckpointDirLock(tmp_path):
                holder = json.loads((tmp_path / LOCK_NAME).read_text())
                assert holder["pid"] == os.getpid()
        assert f"its process {dead_pid} on this host is gone" in caplog.text
        assert (tmp_path / f"{LOCK_NAME}.stale-{dead_pid}").is_file()  # kept for whoever investigates


def test_a_holder_on_another_host_is_named_with_how_to_break_it(tmp_path, ledger, monkeypatch):
    with ledger.scenario("lock held by a run on another host"):
        _plant(tmp_path, host="node-b.cluster", pid=4242, job_id="777")
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        with pytest.raises(CheckpointLocked, match=r"\(host node-b\.cluster pid 4242, Slurm job 777; last heartbeat "
                                                   r"\d+ s ago .*remove .*\.largelm\.lock"):
            CheckpointDirLock(tmp_path).acquire()
    with ledger.scenario("lock of an earlier incarnation of this Slurm job (requeued on another node)"):
        monkeypatch.setenv("SLURM_JOB_ID", "777")
        with CheckpointDirLock(tmp_path):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["job_id"] == "777"


@pytest.mark.slow
def test_duplicate_launch_during_a_run_is_refused_and_the_run_loses_nothing(run_config, tmp_path, capsys, ledger):
    """The reproduced case: run B started on run A's directory while A trains. Before the lock B deleted A's save
    in progress and rotated A's newest checkpoint away."""
    config = run_config(tmp_path)
    second = {}

    def start_second_run(line: str) -> bool:  # while A prints its step 3, B is launched on the same directory
        if line.startswith("step 3/") and not second:
            second["code"] = launch.main(["--config", str(config), "--nproc", "2"])
            second["err"] = capsys.readouterr().err
        return False

    with ledger.scenario("duplicate launch on the checkpoint dir of a running job"):
        first = run(config, kill_when=start_second_run)
        first.check_ok()
        assert second["code"] == 2 and "is in use by another run" in second["err"], second
        assert first.saved == [2, 4, 6, 8]
        assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == ["step_00000006", "step_00000008"]
        assert not (tmp_path / "ckpt" / LOCK_NAME).exists()

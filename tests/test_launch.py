"""The launcher builds the right deepspeed/torchrun command lines (multi-node options included), and
``largelm.ds_launcher`` runs DeepSpeed's runner and per-node launcher in one process."""

import os
import signal
import subprocess
import sys
import time

import pytest

from largelm import ds_launcher
from largelm.launch import DEEPSPEED_MODULE, build_command, build_parser, cpu_environment
from largelm.parallel.deepspeed_compat import launcher as launcher_compat


def cmd(*argv):
    return build_command(build_parser().parse_args(["--config", "c.yaml", *argv]))


def test_deepspeed_single_node():
    c = cmd("--nproc", "2", "--", "train.steps=5")
    assert c[1:3] == ["-m", DEEPSPEED_MODULE] and "--num_gpus=2" in c
    assert c[-4:] == ["largelm.train.main", "--config", "c.yaml", "train.steps=5"] and "--module" in c


def test_deepspeed_hostfile_include_exclude():
    c = cmd("--nproc", "8", "--num-nodes", "2", "--hostfile", "hf", "--include", "n1:0,1@n2", "--master-port", "1234")
    assert {"--hostfile=hf", "--num_nodes=2", "--include=n1:0,1@n2", "--master_port=1234"} <= set(c)
    with pytest.raises(SystemExit, match="--hostfile"):
        cmd("--nproc", "8", "--num-nodes", "2")


def test_deepspeed_no_ssh_per_node():
    c = cmd("--nproc", "4", "--num-nodes", "2", "--no-ssh", "--node-rank", "1", "--master-addr", "n1")
    assert {"--no_ssh", "--num_nodes=2", "--node_rank=1", "--master_addr=n1"} <= set(c)


def test_torchrun_single_and_multi_node():
    c = cmd("--launcher", "torchrun", "--nproc", "2")
    assert "torch.distributed.run" in c and "--standalone" in c and "--nproc-per-node=2" in c
    c = cmd("--launcher", "torchrun", "--nproc", "8", "--num-nodes", "4", "--node-rank", "3", "--master-addr", "h0")
    assert {"--nnodes=4", "--node-rank=3", "--master-addr=h0"} <= set(c)
    with pytest.raises(SystemExit, match="master-addr"):
        cmd("--launcher", "torchrun", "--nproc", "8", "--num-nodes", "2")


def test_cpu_environment_splits_cores():
    env = cpu_environment({}, nproc=2)
    assert env["DS_ACCELERATOR"] == "cpu" and int(env["OMP_NUM_THREADS"]) >= 1
    assert cpu_environment({"OMP_NUM_THREADS": "7"}, 2)["OMP_NUM_THREADS"] == "7"
    allowed = os.sched_getaffinity(0)
    try:  # one core allowed (as a Slurm step with --cpus-per-task=1 pins it): one thread per rank, not cores // nproc
        os.sched_setaffinity(0, {min(allowed)})
        assert cpu_environment({}, 1)["OMP_NUM_THREADS"] == "1"
    finally:
        os.sched_setaffinity(0, allowed)
    assert cpu_environment({}, 1)["OMP_NUM_THREADS"] == str(len(allowed))


@pytest.mark.parametrize("option, value, message", [
    ("--nproc", "0", "argument --nproc: must be >= 1, got 0"),
    ("--num-nodes", "-2", "argument --num-nodes: must be >= 1, got -2"),
    ("--nproc", "two", "argument --nproc: 'two' is not an integer"),
])
def test_counts_must_be_positive(capsys, option, value, message):
    """A zero rank count used to divide by zero in cpu_environment; now it is a usage error naming the option."""
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--config", "c.yaml", option, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_ds_launcher_runs_the_local_launch_in_process(monkeypatch):
    """The runner's local ``deepspeed.launcher.launch`` command becomes a call with that command's arguments and
    environment; the runner module's ``subprocess`` is put back afterwards."""
    from deepspeed.launcher import runner

    calls = []
    monkeypatch.setattr(ds_launcher, "run_launch", lambda argv, env: calls.append((argv, env)) or 7)
    real = runner.subprocess
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert ds_launcher.main(["--num_gpus=2", "--master_port=29999", "--module", "largelm.train.main", "--config",
                             "c.yaml", "train.steps=5"]) == 7
    assert runner.subprocess is real
    (argv, env), = calls
    assert argv[0].startswith("--world_info=") and "--master_port=29999" in argv and "--module" in argv
    assert argv[-4:] == ["largelm.train.main", "--config", "c.yaml", "train.steps=5"]
    assert env["DS_ACCELERATOR"] == "cpu"


def test_ds_launcher_spawner_passes_other_commands_through():
    spawner = launcher_compat.Spawner(subprocess)
    assert spawner.DEVNULL is subprocess.DEVNULL
    proc = spawner.Popen([sys.executable, "-c", "pass"])  # e.g. the pdsh command of a multi-node launch
    assert proc.wait() == 0
    with pytest.raises(launcher_compat.LocalLaunch):
        spawner.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch", "--world_info=x", "s.py"], env={})


@pytest.mark.slow
def test_ds_launcher_end_to_end_exit_code(tmp_path):
    """A real launch of 2 ranks: they are children of the launcher process itself (no second launcher process),
    a failing rank's exit code is the launcher's, and the healthy rank is not waited for."""
    script = tmp_path / "rank.py"
    script.write_text("import os, sys, time\n"
                      "print('rank', os.environ['RANK'], 'parent', os.getppid(), flush=True)\n"
                      "time.sleep(60) if os.environ['RANK'] == '0' else sys.exit(3)\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", DEEPSPEED_MODULE, "--num_gpus=2", "--master_port=29998",
                             str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out
    parents = {line.split()[3] for line in out.splitlines() if line.startswith("rank ")}
    assert parents == {str(proc.pid)}, out
    assert "exits with return code = 3" in out
    assert time.monotonic() - start < 55  # rank 0 was terminated, not waited for


def test_launcher_ends_a_stopped_rank_without_waiting_30_s():
    """DeepSpeed's launch ends its ranks with SIGTERM and SIGKILLs them 30 s later; a stopped (frozen) rank cannot act
    on SIGTERM, so every job with a frozen rank waited those 30 s. continue_stopped_ranks sends SIGCONT first."""
    from deepspeed.launcher import launch

    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # a process this test started
    try:
        os.kill(rank.pid, signal.SIGSTOP)
        started = time.monotonic()
        with launcher_compat.continue_stopped_ranks():
            launch.terminate_process_tree(rank.pid)
        elapsed = time.monotonic() - started
        rank.wait(timeout=5)  # (DeepSpeed's psutil.wait_procs has reaped it: Popen sees no status of its own)
        assert elapsed < 10, f"the stopped rank was ended after {elapsed:.0f} s"
        assert launch.terminate_process_tree.__module__ == "deepspeed.launcher.launch"  # restored after the block
    finally:
        if rank.poll() is None:
            rank.kill()
            rank.wait()

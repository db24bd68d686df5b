"""A multi-node launch that would go wrong silently or late is refused by ``largelm-launch`` before anything starts,
naming the option and the numbers (largelm/launch_plan.py, largelm/parallel/network.py)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from largelm import launch
from largelm.parallel.deepspeed_compat import ops


def _launch(capsys, config, *options) -> tuple[int, str, str]:
    code = launch.main(["--config", str(config), "--dry-run", *options])
    out = capsys.readouterr()
    return code, out.out, out.err


def _refused(capsys, config, *options) -> str:
    code, out, err = _launch(capsys, config, *options)
    assert code == 2, out + err
    assert "+ " not in out  # no launcher command was printed or run
    return err


def test_hostfile_with_fewer_hosts_than_nodes_is_refused(run_config, tmp_path, capsys, ledger):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one host only\nnode-a slots=1\n")
    with ledger.scenario("short hostfile: 1 host for --num-nodes 2"):
        err = _refused(capsys, run_config(tmp_path), "--hostfile", str(hostfile), "--num-nodes", "2", "--nproc", "1")
        assert "gives 1 host(s) (node-a) but --num-nodes is 2: the run would start 1 ranks, not the 2" in err


@pytest.mark.parametrize("text,message", [
    ("node-a slots=1\nnode-b slots=two\n", r"hostfile:2: 'node-b slots=two' is not 'HOST slots=N'"),
    ("node-a slots=0\nnode-b slots=1\n", r"hostfile:1: 'node-a slots=0' is not 'HOST slots=N' with N >= 1"),
    ("node-a slots=1\nnode-a slots=1\n", r"multiple entries for node-a"),
])
def test_malformed_hostfile_is_refused_naming_the_line(run_config, tmp_path, capsys, ledger, text, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    with ledger.scenario(f"malformed hostfile ({message.split(':')[-1].strip()[:40]})"):
        err = _refused(capsys, run_config(tmp_path), "--hostfile", str(hostfile), "--num-nodes", "2", "--nproc", "1")
        assert re.search(message, err), err


@pytest.mark.parametrize("rank", [None, "2", "-1"])
def test_per_node_launch_needs_an_in_range_node_rank(run_config, tmp_path, capsys, ledger, rank):
    options = ["--no-ssh", "--num-nodes", "2", "--nproc", "1", "--master-addr", "192.0.2.2"]
    options += [] if rank is None else ["--node-rank", rank]
    with ledger.scenario(f"per-node launch with node rank {rank or 'missing'}"):
        err = _refused(capsys, run_config(tmp_path), *options)
        assert f"--node-rank is {rank or 'missing'}: each node of a per-node launch needs its own, 0 .. 1" in err


def test_per_node_launch_needs_the_master_address_and_never_ssh(run_config, tmp_path, capsys, ledger):
    with ledger.scenario("per-node launch without --master-addr (DeepSpeed would ssh for it)"):
        err = _refused(capsys, run_config(tmp_path), "--no-ssh", "--num-nodes", "2", "--nproc", "1",
                       "--node-rank", "1")
        assert "needs --master-addr" in err


def test_per_node_launch_as_the_readme_shows_it_gets_a_hostfile(run_config, tmp_path, capsys):
    code, out, _ = _launch(capsys, run_config(tmp_path), "--no-ssh", "--num-nodes", "2", "--nproc", "1",
                           "--node-rank", "1", "--master-addr", "192.0.2.2", "--master-port", "29999")
    assert code == 0
    command = next(line for line in out.splitlines() if line.startswith("+ "))
    hostfile = command.split("--hostfile=")[1].split()[0]
    assert open(hostfile).read() == "node0 slots=1\nnode1 slots=1\n"
    assert "--no_ssh --node_rank=1" in command and "--master_addr=192.0.2.2" in command


def test_loopback_master_address_on_a_multi_node_run_is_refused(run_config, tmp_path, capsys, ledger):
    with ledger.scenario("multi-node master address that resolves to loopback"):
        err = _refused(capsys, run_config(tmp_path), "--no-ssh", "--num-nodes", "2", "--nproc", "1",
                       "--node-rank", "0", "--master-addr", "localhost")
        assert "--master-addr localhost resolves to 127.0.0.1, a loopback address: the other 1 node(s)" in err


def test_busy_master_port_is_refused_naming_its_holder(run_config, tmp_path, capsys, ledger):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with ledger.scenario("master port already in use"):
            err = _refused(capsys, run_config(tmp_path), "--nproc", "2", "--master-port", str(port))
            assert f"master port {port} on 127.0.0.1 is already in use by pid {os.getpid()}" in err


def test_environment_for_remote_ranks_is_written_for_deepspeed(run_config, tmp_path, capsys, ledger, monkeypatch):
    """Ranks started over pdsh/ssh got only MASTER_*, RANK, WORLD_SIZE, PYTHONPATH: not what largelm-launch sets
    for CPU runs nor GLOO_SOCKET_IFNAME exported by the user."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("SECRET_TOKEN", "not for the ranks")
    with ledger.scenario("environment lost over ssh (DS_ENV_FILE written)"):
        code, out, err = _launch(capsys, run_config(tmp_path), "--hostfile", str(hostfile), "--num-nodes", "2",
                                 "--nproc", "1", "--master-addr", "192.0.2.2", "--master-port", "29999")
        assert code == 0, err
        env_file = out.split("environment for the ranks on other hosts: ")[1].split()[0]
        lines = dict(line.split("=", 1) for line in open(env_file).read().splitlines())
        assert lines["GLOO_SOCKET_IFNAME"] == "ib0" and lines["DS_ACCELERATOR"] == "cpu"
        assert "OMP_NUM_THREADS" in lines and "MALLOC_MMAP_MAX_" in lines and "SECRET_TOKEN" not in lines
        assert os.stat(env_file).st_mode & 0o077 == 0  # values may be secrets: only the user reads it


_PREPARE = ("from largelm.parallel.deepspeed_compat.ops import prepare_cpu_comm_op; "
            "print('built in', prepare_cpu_comm_op())")


def _build_dir() -> Path:
    """The op's build directory as the ranks use it (built by scripts/install.sh or an earlier run)."""
    out = subprocess.run([sys.executable, "-c", _PREPARE], capture_output=True, text=True, timeout=600, check=True)
    return Path(out.stdout.split("built in ")[1].split()[0])


def test_stale_build_lock_is_cleared_with_a_warning(ledger):
    """A launch killed while DeepSpeed built its CPU comm op left torch's lock file: every later launch waited
    forever, silently. Now the dead build's locks are removed with a warning and the op loads."""
    build = _build_dir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with ledger.scenario("stale build lock of DeepSpeed's CPU comm op (killed build)"):
        (build / "lock").write_text("")  # torch's FileBaton, as a killed build leaves it
        (build / "largelm-build.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-c", _PREPARE], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert time.monotonic() - started < 120
        assert f"removing a stale build lock {build / 'largelm-build.lock'} of pid {int(dead.stdout)}" in out.stdout
        assert f"removing {build / 'lock'}, left by a build that was killed" in out.stdout
        assert not (build / "lock").exists() and not (build / "largelm-build.lock").exists()


def test_a_live_build_is_waited_for_with_a_message(ledger):
    build = _build_dir()
    with ledger.scenario("build lock held by a live process: the wait says what it waits for"):
        (build / "largelm-build.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        waiting = subprocess.Popen([sys.executable, "-c", _PREPARE], stdout=subprocess.PIPE, text=True)
        try:
            line = waiting.stdout.readline()  # the first line it prints: the wait, named
            assert f"for pid {os.getpid()} on {socket.gethostname()} building deepspeed_shm_comm" in line, line
        finally:
            (build / "largelm-build.lock").unlink(missing_ok=True)
        assert waiting.wait(timeout=300) == 0


def test_two_ninja_versions_build_in_separate_directories(tmp_path, monkeypatch, ledger):
    """Debian's ninja 1.11 and the venv's ninja 1.13 (first on PATH only in an activated venv) discard each other's
    build log: sharing one build directory, they rebuilt the op (30-80 s) at every switch. Each gets its own."""
    builder = ops._builder()
    assert builder is not None
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ninja").write_text("#!/bin/sh\necho 1.99.0-test\n")
    (fake / "ninja").chmod(0o755)
    with ledger.scenario("CPU comm op rebuilt in turn by two ninja versions sharing a build directory"):
        usual = ops.extensions_dir(builder)
        monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
        assert ops.build_tools()[:2] == [str(fake / "ninja"), "1.99.0-test"]
        other = ops.extensions_dir(builder)
        assert other != usual and other.parent == usual.parent
        monkeypatch.setenv("CXX", "clang++-nonexistent")
        assert ops.extensions_dir(builder) not in (usual, other)
        with ops.interpreter_tools_first():  # how the op is built: the venv's ninja, whatever PATH says
            venv_ninja = Path(sys.prefix) / "bin" / "ninja"
            assert ops.build_tools()[0] == str(venv_ninja if venv_ninja.exists() else fake / "ninja")
        assert os.environ["PATH"].startswith(f"{fake}:")


def test_node_signal_reaches_only_this_jobs_ranks(tmp_path, ledger):
    """`node.sh --signal` (pdsh launcher) found ranks with pgrep over the whole node: another job's ranks of the same
    user and config got the stop signal too. Now only processes carrying this job's LARGELM_JOB_TAG are signalled."""
    config = str(tmp_path / "config.yaml")
    fake_rank = 'trap "echo USR1 >> $0.got" USR1; echo ready; while :; do sleep 0.05; done'
    ranks = {}
    for job in ("this", "other"):  # shaped like ranks: bash -c ... -m largelm.train.main --config <config>
        marker = tmp_path / job
        ranks[job] = subprocess.Popen(["bash", "-c", fake_rank, str(marker), "-m", "largelm.train.main",
                                       "--config", config], env=dict(os.environ, LARGELM_JOB_TAG=f"job-{job}"),
                                      stdout=subprocess.PIPE, text=True)
        assert ranks[job].stdout.readline().strip() == "ready"
    try:
        with ledger.scenario("node.sh --signal with another job's ranks on the node (same user, same config)"):
            env = dict(os.environ, LARGELM_JOB_TAG="job-this", LARGELM_JOB_CONFIG=config,
                       LARGELM_JOB_LAUNCHER="deepspeed", LARGELM_JOB_NNODES="2")
            subprocess.run(["bash", str(Path(__file__).parents[2] / "slurm" / "node.sh"), "--signal", "USR1"],
                           env=env, check=True, timeout=30)
            deadline = time.monotonic() + 10
            while not (tmp_path / "this.got").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert (tmp_path / "this.got").exists() and not (tmp_path / "other.got").exists()
    finally:
        for proc in ranks.values():  # the processes this test started
            proc.kill()
            proc.wait()

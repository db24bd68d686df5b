"""Two hosts for real: two network namespaces joined by a veth pair (addresses assigned here, only inside them), one
``largelm-launch --no-ssh --node-rank N --master-addr <host 0>`` per host, as the README shows it for a cluster.

The run must train with world size 2 over the veth (its byte counters move), each rank must pick the veth for gloo
from the route to the master (the host name here resolves to loopback, which used to make gloo bind 127.0.0.1),
and the losses must equal the same layout's on one host bit for bit (CPU, same collectives). Skipped, with the
reason printed, where the machine refuses network namespaces (not root)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultkit import environ_of, tb_scalars, training_ranks
from netns_hosts import Host, NetnsRefused, netns_hosts
from train_utils import REPO, check_ok, free_port, launch, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_hosts():
    """Two hosts; their host name (this machine's) resolves to loopback, as Debian's 127.0.1.1 entry makes it."""
    try:
        with netns_hosts("mh", subnet=231) as hosts:
            yield hosts
    except NetnsRefused as why:
        pytest.skip(str(why))


def _start_per_node(hosts: list[Host], config: Path) -> list[subprocess.Popen]:
    """One largelm-launch per host (node rank = index), all started together, each in its own process group, each
    writing to ``<config dir>/node<rank>.log`` (files, not pipes: a node whose output nobody reads must not block)."""
    port = str(free_port())
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    procs = []
    for rank, h in enumerate(hosts):
        with open(config.parent / f"node{rank}.log", "w") as log:
            proc = subprocess.Popen(["ip", "netns", "exec", h.netns, sys.executable, "-m", "largelm.launch",
                                     "--config", str(config), "--nproc", "1", "--num-nodes", str(len(hosts)),
                                     "--no-ssh", "--node-rank", str(rank), "--master-addr", hosts[0].address,
                                     "--master-port", port],
                                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc.log = Path(log.name)
        procs.append(proc)
    return procs


def _outputs(procs: list[subprocess.Popen]) -> list[str]:
    return [proc.log.read_text(errors="replace") for proc in procs]


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every node to end; on a timeout, fail with every node's output."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            tails = "\n".join(f"--- node {i} ---\n{out[-4000:]}" for i, out in enumerate(_outputs(procs)))
            pytest.fail(f"the per-node launch did not end within {timeout:.0f} s:\n{tails}")
    return _outputs(procs)


def _end(procs: list[subprocess.Popen]) -> None:
    for proc in procs:  # only the process groups this test started
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _per_node_launch(hosts: list[Host], config: Path, timeout: float = 400) -> list[str]:
    """Run a per-node launch to the end (each node must exit 0); returns each node's output."""
    procs = _start_per_node(hosts, config)
    try:
        outputs = _wait_all(procs, timeout)
        for proc, out in zip(procs, outputs):
            assert proc.returncode == 0, f"node exited {proc.returncode}:\n{out[-5000:]}"
    finally:
        _end(procs)
    return outputs


def test_per_node_launch_on_two_hosts_trains_like_one_host(two_hosts, tmp_path, tokenizer_path, shard_dir,
                                                          shard_seq_length, ledger):
    def config(name):
        (tmp_path / name).mkdir()
        # bounded waits: a hang fails with the stacks (watchdog) or a timeout error, well before the test's limit
        return tiny_config(tmp_path / name, tokenizer_path, shard_dir, shard_seq_length,
                           train={"steps": 6, "hang_timeout_s": 60}, parallel={"zero_stage": 2, "timeout_s": 120},
                           checkpoint={"dir": str(tmp_path / name / "ckpt"), "save_interval": 6})

    # 2 threads per rank, as each per-node launch gives its one rank (the thread count changes reduction order)
    one_host = check_ok(launch(config("one-host"), nproc=2, env={"OMP_NUM_THREADS": "2"}))
    before = [h.tx_bytes() for h in two_hosts]
    with ledger.scenario("two hosts whose host name resolves to loopback (gloo interface from the route)"):
        outputs = _per_node_launch(two_hosts, config("two-hosts"))
    sent = [h.tx_bytes() - b for h, b in zip(two_hosts, before)]
    assert min(sent) > 1_000_000, sent  # gradients and parameters crossed the veth both ways
    node0 = outputs[0]
    assert f"network: gloo/NCCL on interface {two_hosts[0].veth} ({two_hosts[0].address}" in node0
    assert f"network: gloo/NCCL on interface {two_hosts[1].veth} ({two_hosts[1].address}" in outputs[1]
    manifest = json.loads((tmp_path / "two-hosts" / "ckpt" / "step_00000006" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and "step 6/6" in node0
    ours = tb_scalars(tmp_path / "two-hosts" / "tb")["train/loss"]
    reference = tb_scalars(tmp_path / "one-host" / "tb")["train/loss"]
    assert len(ours) == 6 and ours == reference, (ours, reference)
    assert "step 6/6" in one_host


def _partitioned_run(hosts: list[Host], config) -> tuple[list[int], list[str], float]:
    """Start a per-node run, cut host 1 off (veth down) at step 5, reconnect when both launches have ended:
    (exit codes, outputs, seconds from the cut to the end)."""
    procs = _start_per_node(hosts, config)
    try:
        deadline = time.monotonic() + 300
        while "\nstep 5/" not in procs[0].log.read_text(errors="replace"):  # node 0 prints the step lines
            assert time.monotonic() < deadline and procs[0].poll() is None, _outputs(procs)[0][-4000:]
            time.sleep(0.1)
        hosts[1].run("ip", "link", "set", hosts[1].veth, "down")  # the partition
        cut = time.monotonic()
        outputs = _wait_all(procs, 180)
        return [p.returncode for p in procs], outputs, time.monotonic() - cut
    finally:
        hosts[1].run("ip", "link", "set", hosts[1].veth, "up")
        _end(procs)


def test_network_partition_ends_the_job_on_both_hosts_and_the_relaunch_resumes(two_hosts, tmp_path, tokenizer_path,
                                                                               shard_dir, shard_seq_length, ledger):
    """A partition keeps TCP connections "established" and no bytes flow: each rank's watchdog must notice (no
    progress for train.hang_timeout_s), dump its stacks and exit 43 on both hosts; back together, the per-node
    relaunch resumes from the last checkpoint."""
    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length,
                         train={"steps": 30, "hang_timeout_s": 15},
                         # the cut may land inside a save (node 0's log lags): bounded by save_timeout_s there
                         checkpoint={"dir": str(tmp_path / "ckpt"), "save_interval": 2, "keep_last": 2,
                                     "save_timeout_s": 15})
    with ledger.scenario("network partition between two hosts (veth down) mid-run"):
        codes, outputs, ended = _partitioned_run(two_hosts, config)
        assert ended < 120, ended
        for rank, (code, out) in enumerate(zip(codes, outputs)):
            assert code == 43, (rank, code, out[-3000:])
            assert f"error (rank {rank}): no progress for" in out and "(most recent call first)" in out
        resumed = _per_node_launch(two_hosts, config)
        assert "resumed from" in resumed[0] and "step 30/30" in resumed[0], resumed[0][-3000:]


SSH_PACKAGES = {"sshd": "openssh-server", "pdsh": "pdsh"}


def _ensure_ssh_tools() -> None:
    """sshd and pdsh from Debian's apt (installed here when missing, as the Slurm tests install Slurm)."""
    missing = [pkg for tool, pkg in SSH_PACKAGES.items() if not shutil.which(tool, path="/usr/sbin:/usr/bin")]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{', '.join(missing)} missing and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ssh_hosts(two_hosts, tmp_path_factory):
    """An sshd inside each namespace (its own host key, key auth for this test's key only), and a bin directory
    whose ``ssh`` uses this test's client config: DeepSpeed's runner and pdsh call ``ssh`` from PATH."""
    _ensure_ssh_tools()
    d = tmp_path_factory.mktemp("ssh")
    for key in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "id.pub").read_text())
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    daemons = []
    for i, h in enumerate(two_hosts):
        config = d / f"sshd_config.{i}"
        config.write_text(f"ListenAddress {h.address}\nPort 22\nHostKey {d / 'host_key'}\nPidFile {d}/sshd.{i}.pid\n"
                          f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                          "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n")
        daemons.append(subprocess.Popen(["ip", "netns", "exec", h.netns, "/usr/sbin/sshd", "-D", "-e", "-f",
                                         str(config)], stderr=subprocess.DEVNULL))
    (d / "ssh_config").write_text(f"Host *\n  IdentityFile {d / 'id'}\n  StrictHostKeyChecking no\n"
                                  "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n")
    bindir = d / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f"#!/bin/sh\nexec /usr/bin/ssh -F {d / 'ssh_config'} \"$@\"\n")
    (bindir / "ssh").chmod(0o755)
    try:
        deadline = time.monotonic() + 30
        for h in two_hosts:  # each sshd answers, from the other namespace
            while subprocess.run(["ip", "netns", "exec", two_hosts[0].netns, str(bindir / "ssh"), h.address, "true"],
                                 capture_output=True).returncode != 0:
                assert time.monotonic() < deadline, f"sshd on {h.address} did not come up"
                time.sleep(0.3)
        yield two_hosts, bindir
    finally:
        for daemon in daemons:  # the daemons this fixture started
            daemon.terminate()
            daemon.wait(timeout=10)


def test_deepspeed_launcher_over_ssh_reaches_the_other_host_with_the_environment(ssh_hosts, tmp_path, tokenizer_path,
                                                                               shard_dir, shard_seq_length, ledger):
    """The deepspeed launcher with a hostfile, reaching both hosts over ssh/pdsh: the ranks there must get what
    largelm-launch sets for CPU runs and what the user exported (DS_ENV_FILE), not only MASTER_*/RANK/PYTHONPATH."""
    hosts, bindir = ssh_hosts
    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length, train={"steps": 6},
                         checkpoint={"dir": str(tmp_path / "ckpt"), "save_interval": 6})
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h.address} slots=1\n" for h in hosts))
    mark = f"multihost-{os.getpid()}"
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               LARGELM_TEST_MARK=mark)
    seen: dict[int, dict] = {}
    before = [h.tx_bytes() for h in hosts]
    proc = subprocess.Popen(["ip", "netns", "exec", hosts[0].netns, sys.executable, "-m", "largelm.launch",
                             "--config", str(config), "--hostfile", str(hostfile), "--num-nodes", "2", "--nproc", "1",
                             "--master-addr", hosts[0].address, "--master-port", str(free_port())],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        with ledger.scenario("environment of ranks started over ssh/pdsh on another host"):
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "step 2/" in line and not seen:
                    marked = training_ranks(lambda _pid, env: env.get("LARGELM_TEST_MARK") == mark)
                    seen.update({rank: environ_of(pid) for rank, pid in marked.items()})
            assert proc.wait(timeout=60) == 0, "".join(lines)[-5000:]
            assert sorted(seen) == [0, 1], (seen.keys(), "".join(lines)[-3000:])
            remote = seen[1]
            assert remote["DS_ACCELERATOR"] == "cpu" and remote["OMP_NUM_THREADS"] == "2"
            assert remote["MALLOC_MMAP_MAX_"] == "0"
            assert f"network: gloo/NCCL on interface {hosts[1].veth} ({hosts[1].address}" in "".join(lines)
            assert min(h.tx_bytes() - b for h, b in zip(hosts, before)) > 1_000_000
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # ranks this test started through sshd, if any are left
        for pid in training_ranks(lambda _pid, env: env.get("LARGELM_TEST_MARK") == mark).values():
            os.kill(pid, signal.SIGKILL)

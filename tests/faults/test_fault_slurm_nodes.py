"""Slurm with two nodes for real: two network namespaces joined by a veth pair (tests/netns_hosts.py), a slurmd in
each (NodeAddr = its address, its own host name), slurmctld on the first (tests/slurm_cluster.py). The generated
sbatch script (slurm/make_sbatch.py, deepspeed launcher, one rank per node) runs on both nodes:

- preempted with USR1 (``scancel --batch``), it checkpoints, exits 42, requeues and resumes: every step's loss equals
  the same layout's on one host (bit for bit: CPU, the same collectives), and the gradients crossed the veth;
- a frozen node (its rank SIGSTOPped): the other node's watchdog exits 43 after ``train.hang_timeout_s``, srun kills
  the frozen node's task (``--kill-on-bad-exit=1``), the script requeues on 43 and the job resumes from the last
  checkpoint to the end.

Skipped, with the reason printed, only where the machine refuses network namespaces (not root)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from faultkit import tb_scalars, training_ranks
from netns_hosts import NetnsRefused, netns_hosts
from slurm_cluster import LocalSlurm, SlurmError, SlurmNode, is_zombie
from train_utils import REPO, STEP_LINE, check_ok, launch, tiny_config

sys.path.insert(0, str(REPO / "slurm"))
import make_sbatch  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 40
JOB_TIMEOUT = 420


@pytest.fixture(scope="module")
def two_nodes():
    with contextlib.ExitStack() as stack:
        try:
            hosts = stack.enter_context(netns_hosts("sl", subnet=232))
        except NetnsRefused as why:
            pytest.skip(str(why))
        cluster = LocalSlurm(f"/tmp/largelm-slurm2-{os.getuid()}",
                             nodes=[SlurmNode(h.name, h.address, h.netns, h.hosts_file) for h in hosts])
        try:
            cluster.start()
        except (SlurmError, OSError) as err:
            pytest.fail(f"the two-node Slurm cluster did not start:\n{err}", pytrace=False)
        stack.callback(cluster.stop)
        yield cluster, hosts


@pytest.fixture(scope="module")
def config_and_reference(tmp_path_factory, tokenizer_path, shard_dir, shard_seq_length):
    """The tiny GPT (fp32, ZeRO-2, a checkpoint every 4 steps), and its losses from 2 ranks on one host. Each rank
    uses 2 threads, as on the Slurm nodes (largelm-launch gives a node's cores to its one rank): the thread count
    changes the order of reductions inside a matmul, so only then are the losses bit-equal."""
    tmp = tmp_path_factory.mktemp("slurm-nodes")
    config = tiny_config(tmp, tokenizer_path, shard_dir, shard_seq_length, train={"steps": STEPS, "hang_timeout_s": 15},
                         checkpoint={"dir": str(tmp / "ckpt"), "save_interval": 4, "keep_last": 2,
                                     "save_timeout_s": 15})  # a freeze landing in a save: bounded alike
    check_ok(launch(config, nproc=2, env={"OMP_NUM_THREADS": "2"}))
    return config, tb_scalars(tmp / "tb")["train/loss"]


def _submit(cluster: LocalSlurm, config: Path, run_dir: Path) -> tuple[int, Path]:
    script = run_dir / "job.sbatch"
    make_sbatch.main(["--config", str(config), "--nodes", "2", "--nproc-per-node", "1", "--cpus-per-node", "2",
                      "--launcher", "deepspeed", "--run-dir", str(run_dir), "--venv", sys.prefix, "--time", "00:20:00",
                      "--job-name", "two-nodes", "-o", str(script)])
    job = cluster.sbatch(script, cwd=REPO)
    return job, run_dir / "slurm" / f"two-nodes-{job}.out"


def _text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else ""


def _why(cluster: LocalSlurm, job: int, log: Path) -> str:
    return f"\njob {job}: {cluster.job_info(job)}\n--- {log} (tail)\n{_text(log)[-6000:]}\n{cluster.logs(15)}"


def _wait_for_step(cluster: LocalSlurm, job: int, log: Path, step: int) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while not any(int(m.group(1)) >= step for m in STEP_LINE.finditer(_text(log))):
        state = cluster.job_info(job).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING") and time.monotonic() < deadline, \
            f"never reached step {step} (state {state})" + _why(cluster, job, log)
        time.sleep(0.2)


def _check_resumed_run(cluster, job, log, run_dir, reference, exit_code) -> str:
    state = cluster.wait(job, timeout=JOB_TIMEOUT)
    text, why = _text(log), _why(cluster, job, log)
    assert state == "COMPLETED" and cluster.job_info(job)["Restarts"] == "1", why
    first, _, second = text.partition(f"=== largelm: job {job} restart 1 ")
    assert f"training exited with {exit_code}" in first and f"requeueing job {job}" in first, why
    assert "resumed from" in second and f"step {STEPS}/{STEPS}" in second, why
    losses = tb_scalars(run_dir / "tensorboard")["train/loss"]
    assert losses == reference, f"losses differ from one host's:\n{losses}\n{reference}"
    return text


def test_two_node_job_is_preempted_requeued_and_resumes_like_one_host(two_nodes, config_and_reference, tmp_path,
                                                                     ledger):
    cluster, hosts = two_nodes
    config, reference = config_and_reference
    before = [h.tx_bytes() for h in hosts]
    with ledger.scenario("preemption (USR1) of a two-node Slurm job: checkpoint, requeue, resume"):
        job, log = _submit(cluster, config, tmp_path)
        _wait_for_step(cluster, job, log, 3)  # (the ranks see the request a second or two later)
        cluster.run("scancel", "--batch", "--signal=USR1", str(job))
        text = _check_resumed_run(cluster, job, log, tmp_path, reference, 42)
    assert min(h.tx_bytes() - b for h, b in zip(hosts, before)) > 1_000_000  # world size 2 over the veth
    for h in hosts:
        assert f"network: gloo/NCCL on interface {h.veth} ({h.address}" in text, text[-4000:]
    assert (tmp_path / "slurm" / str(job) / "hostfile").read_text() == "".join(f"{h.name} slots=1\n" for h in hosts)


def test_frozen_node_ends_the_step_and_the_job_requeues_and_resumes(two_nodes, config_and_reference, tmp_path,
                                                                   ledger):
    cluster, hosts = two_nodes
    config, reference = config_and_reference
    with ledger.scenario("frozen node (SIGSTOP) in a two-node Slurm job: requeued on 43, resumed"):
        job, log = _submit(cluster, config, tmp_path)
        _wait_for_step(cluster, job, log, 6)  # a checkpoint at step 4
        ranks = training_ranks(lambda _pid, env: env.get("LARGELM_JOB_TAG") == f"{job}.0")  # first start
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGSTOP)  # node 1's rank: frozen, connections open, no bytes
        frozen_at = time.monotonic()
        cluster.wait(job, timeout=120, states={"REQUEUED", "PENDING", "COMPLETING", "FAILED", "COMPLETED"})
        ended = time.monotonic() - frozen_at
        text = _check_resumed_run(cluster, job, log, tmp_path, reference, 43)
        assert ended < 120, ended
        assert not Path(f"/proc/{ranks[1]}").exists() or is_zombie(ranks[1]), "the frozen rank outlived its step"
        assert "error (rank 0): no progress for" in text and "task-0:43 " in text, text[-5000:]


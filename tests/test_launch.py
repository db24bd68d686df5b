"""The launcher builds the right deepspeed/torchrun command lines (multi-node options included)."""

import pytest

from largelm.launch import build_command, build_parser, cpu_environment


def cmd(*argv):
    return build_command(build_parser().parse_args(["--config", "c.yaml", *argv]))


def test_deepspeed_single_node():
    c = cmd("--nproc", "2", "--", "train.steps=5")
    assert c[1:3] == ["-m", "deepspeed.launcher.runner"] and "--num_gpus=2" in c
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

"""Elastic resume: a checkpoint resumed in another parallel layout with ``checkpoint.reshard_on_resume`` carries
the fp32 master weights, Adam's moments and step count and the LR schedule exactly (largelm/checkpoint/elastic.py).

One fp32 source run (DP=2, ZeRO-1, 3 of 6 steps) is shared by the module. Each hop resumes a copy of a checkpoint in
another layout with the real Trainer (spawned gloo ranks), saves at the same step, and the saved checkpoint is
unsharded again (reader.consolidate_states: DeepSpeed's zero_to_fp32 merge) and compared with the source:

* DP=2 -> DP=1 (one replica: DeepSpeed runs ZeRO-0, torch AdamW on the parameters) -> DP=2 ZeRO-1: every tensor
  (masters, exp_avg, exp_avg_sq, vocabulary padding rows), Adam's step, the LR scheduler state and the engine's
  counters equal the source's exactly (torch.equal) after each hop;
* ZeRO-1 -> ZeRO-3 at DP=2: likewise;
* bf16, DP=2 ZeRO-1 (DeepSpeed's BF16_Optimizer) -> DP=1: likewise (the fp32 masters are not rounded to bf16);
* TP=1 -> TP=2, and PP=1 -> PP=2 (DeepSpeed's pipeline engine) -> PP=1: likewise;
* losses: the run resumed resharded from the DP=2 checkpoint continues steps 4-6 at DP=1, at ZeRO-3 and at TP=2
  with the same losses as a reference run that already had that layout and the same state (the checkpoint the
  hop wrote, resumed on DeepSpeed's plain same-layout path). Tolerance: exact. Both runs are the same engine in
  the same layout on the same fp32 state and the same data (where the data-parallel size changed the hop loads
  the merged, layout-independent position and the reference the state the hop saved from it; at ZeRO-3 both
  continue the checkpoint's own per-rank position: largelm/train/data_position.py), so every
  reduction happens in the same order and nothing may differ; a
  difference would mean some state was not carried (a zero moment or an LR off by one step changes the loss).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from mp_utils import free_port, run_ranks
from train_utils import tiny_config

from largelm.checkpoint.elastic import read_reshard_source
from largelm.checkpoint.info import locate_checkpoint

pytestmark = pytest.mark.slow

LOGGING = {"tensorboard_dir": None, "progress_bar": False, "peak_tflops_per_rank": 1.0}
DATA = {"num_workers": 0}  # the ranks are daemonic processes: no DataLoader worker processes
RESHARD = ["checkpoint.reshard_on_resume=true"]


def _rank(rank, world_size, config, overrides, port, action):
    """Build the real Trainer (preflight first, as the launcher does); ``action`` "save": save at the resumed step
    (a hop), "fit": train to train.steps and return the losses."""
    import os

    from largelm.config import load_config
    from largelm.train.preflight import preflight
    from largelm.train.trainer import Trainer

    os.environ["MASTER_PORT"] = str(port)
    cfg = preflight(load_config(config, list(overrides)), world_size)
    trainer = Trainer(cfg)
    try:
        start = trainer.step
        if action == "save":
            trainer.save()
            return {"start": start}
        return {"start": start, "history": trainer.fit()}
    finally:
        trainer.close()


def _run(config, world_size, overrides=(), action="fit") -> dict:
    return run_ranks(_rank, world_size, str(config), list(overrides), free_port(), action, timeout_s=600)[0]


def _hop(src_root, tmp, name, world_size, overrides, base_config) -> tuple:
    """Copy checkpoint root ``src_root``, resume it resharded in the layout ``overrides`` give, save. Returns
    (the new checkpoint root, the config used)."""
    root = tmp / name
    shutil.copytree(src_root, root)
    config = tmp / f"{name}.yaml"
    config.write_text(base_config.read_text().replace(str(base_config.parent / "ckpt"), str(root)))
    result = _run(config, world_size, [*overrides, *RESHARD], action="save")
    assert result["start"] == 3
    return root, config


def _assert_same_state(a_root, b_root) -> None:
    """Unshard both checkpoints (weights, moments, step, schedule, counters) and compare exactly."""
    a, b = read_reshard_source(locate_checkpoint(a_root)), read_reshard_source(locate_checkpoint(b_root))
    assert b.info.step == a.info.step
    pairs = {"fp32": (a.weights, b.weights), **{k: (a.moments[k], b.moments[k]) for k in a.moments}}
    for name, (x, y) in pairs.items():
        assert set(x.tensors) == set(y.tensors) and set(x.padding) == set(y.padding)
        unequal = [t for t in x.tensors if not torch.equal(x.tensors[t], y.tensors[t])]
        unequal += [f"padding {t}" for t in x.padding if not torch.equal(x.padding[t], y.padding[t])]
        assert not unequal, f"{name} differs after resharding {a_root} -> {b_root}: {unequal[:5]}"
    assert float(a.moments["exp_avg_sq"].tensors["decoder.final_layernorm.weight"].abs().max()) > 0  # moments live
    assert torch.equal(a.adam_step, b.adam_step) and float(a.adam_step) == 3.0
    sched_a, sched_b = a.engine_state["lr_scheduler"], b.engine_state["lr_scheduler"]
    # one LR over every parameter group; how many groups depends on the layout (MoE: EP > 1 adds expert groups)
    assert (sched_a["last_epoch"], set(sched_a["_last_lr"])) == (sched_b["last_epoch"], set(sched_b["_last_lr"]))
    assert len(set(sched_a["_last_lr"])) == 1
    assert a.engine_state["global_steps"] == b.engine_state["global_steps"] == 3


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer_path, shard_dir, shard_seq_length):
    """DP=2 ZeRO-1 fp32, 3 of 6 steps (train.exit_interval): a checkpoint at step 3 mid-schedule."""
    tmp = tmp_path_factory.mktemp("elastic_fp32")
    config = tiny_config(tmp, tokenizer_path, shard_dir, shard_seq_length, logging=LOGGING, data=DATA,
                         parallel={"zero_stage": 1}, train={"steps": 6, "exit_interval": 3})
    _run(config, 2)
    return {"tmp": tmp, "config": config, "ckpt": tmp / "ckpt"}


@pytest.fixture(scope="module")
def dp1(source):
    return _hop(source["ckpt"], source["tmp"], "dp1", 1, [], source["config"])


@pytest.fixture(scope="module")
def zero3(source):
    return _hop(source["ckpt"], source["tmp"], "zero3", 2, ["parallel.zero_stage=3"], source["config"])


@pytest.fixture(scope="module")
def tp2(source):
    return _hop(source["ckpt"], source["tmp"], "tp2", 2, ["parallel.tensor_parallel=2"], source["config"])


def test_dp2_to_dp1_to_dp2_carries_the_optimizer_bit_exactly(source, dp1):
    dp1_root, _ = dp1
    _assert_same_state(source["ckpt"], dp1_root)
    assert read_reshard_source(locate_checkpoint(dp1_root)).info.data_parallel == 1
    back, _ = _hop(dp1_root, source["tmp"], "dp2_again", 2, [], source["config"])
    _assert_same_state(source["ckpt"], back)


def test_zero1_to_zero3_carries_the_optimizer_bit_exactly(source, zero3):
    root, _ = zero3
    assert read_reshard_source(locate_checkpoint(root)).info.zero_stage == 3
    _assert_same_state(source["ckpt"], root)


@pytest.mark.parametrize("layout", ["dp1", "zero3", "tp2"])
def test_resharded_resume_continues_like_a_run_in_that_layout(source, dp1, zero3, tp2, layout, tmp_path):
    """Steps 4-6 resumed resharded from the DP=2 ZeRO-1 checkpoint == steps 4-6 of the same layout resumed on the
    plain path from the same state (the hop's checkpoint): exactly (module docstring)."""
    hop_root, hop_config = {"dp1": dp1, "zero3": zero3, "tp2": tp2}[layout]
    world, overrides = {"dp1": (1, []), "zero3": (2, ["parallel.zero_stage=3"]),
                        "tp2": (2, ["parallel.tensor_parallel=2"])}[layout]
    ref_root = tmp_path / "reference"  # a copy: the hop's checkpoint stays at step 3 for the other tests
    shutil.copytree(hop_root, ref_root)
    ref_config = tmp_path / "reference.yaml"
    ref_config.write_text(hop_config.read_text().replace(str(hop_root), str(ref_root)))
    reference = _run(ref_config, world, overrides)  # same layout as its checkpoint: DeepSpeed's own load
    root = tmp_path / "ckpt"
    shutil.copytree(source["ckpt"], root)
    config = tmp_path / "resharded.yaml"
    config.write_text(source["config"].read_text().replace(str(source["ckpt"]), str(root)))
    resumed = _run(config, world, [*overrides, *RESHARD])
    assert reference["start"] == resumed["start"] == 3
    assert [s for s, _ in resumed["history"]] == [4, 5, 6]
    assert resumed["history"] == reference["history"], (resumed["history"], reference["history"])


def test_bf16_dp2_to_dp1_carries_the_fp32_optimizer_state(tmp_path, tokenizer_path, shard_dir, shard_seq_length):
    """BF16_Optimizer partitions (DP=2) -> one replica (BF16_Optimizer on one rank): masters stay fp32-exact."""
    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length, logging=LOGGING, data=DATA,
                         model={"num_layers": 1, "hidden_size": 32},
                         parallel={"zero_stage": 1}, train={"steps": 6, "exit_interval": 3, "precision": "bf16"})
    _run(config, 2)
    root, _ = _hop(tmp_path / "ckpt", tmp_path, "dp1", 1, [], config)
    _assert_same_state(tmp_path / "ckpt", root)


def test_tp1_to_tp2_carries_the_optimizer_bit_exactly(source, tp2):
    """DP=2 -> TP=2 (one replica: DeepSpeed runs ZeRO-0; the vocabulary is padded for TP=2): exact."""
    root, _ = tp2
    assert read_reshard_source(locate_checkpoint(root)).info.tensor_parallel == 2
    _assert_same_state(source["ckpt"], root)


def test_pp1_to_pp2_to_pp1_carries_the_optimizer_bit_exactly(source):
    """DP=2 -> PP=2 (DeepSpeed's pipeline engine, ZeRO-1; the tied embedding on both stages) -> DP=2 again."""
    pp2, _ = _hop(source["ckpt"], source["tmp"], "pp2", 2, ["parallel.pipeline_parallel=2"], source["config"])
    assert read_reshard_source(locate_checkpoint(pp2)).info.pipeline_parallel == 2
    _assert_same_state(source["ckpt"], pp2)
    back, _ = _hop(pp2, source["tmp"], "pp1_again", 2, [], source["config"])
    _assert_same_state(source["ckpt"], back)

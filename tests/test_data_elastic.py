"""Elastic data position: a loader state taken on one data-parallel layout resumes on another, and every epoch in
progress is still consumed exactly once per dataset (largelm/data/position.py, docs/fault_tolerance.md)."""

import collections
import copy
import json
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from mp_utils import run_ranks
from train_utils import tiny_config

from largelm.data import DataError, build_loader, merge_loader_states
from largelm.data.format import encode_tokens, sample_key
from largelm.data.position import ConsumedSet, subtract, take_positions, union
from largelm.fileio import sha256_file
from largelm.parallel.deepspeed_compat import safe_torch_load

SIZES = (96, 30)  # samples of the two blended datasets


@pytest.fixture(scope="module")
def blend(make_token_shards, tmp_path_factory):
    """Two synthetic datasets (shards of 10 and of 7 samples, the last ones short), blended 2:1."""
    root = tmp_path_factory.mktemp("elastic")
    return [(make_token_shards(root / "a", SIZES[0]), 2.0),
            (make_token_shards(root / "b", SIZES[1], samples_per_shard=7), 1.0)]


def make(blend, rank, world, workers, **kwargs):
    return build_loader(blend, 8, 4, rank=rank, world_size=world, num_workers=workers, shuffle_buffer=6, seed=17,
                        **kwargs)


def consume(loader, n):
    """``n`` batches: the samples as (dataset, epoch, key), and the batches."""
    samples, batches = [], []
    for batch in loader:
        batches.append(batch)
        samples += zip(batch["dataset"].tolist(), batch["epoch"].tolist(), batch["key"])
        if len(batches) == n:
            break
    return samples, batches


def run_layout(blend, world, workers, batches, state=None, **kwargs):
    """Every rank of a layout (optionally resumed from a global state) consumes ``batches`` batches; returns the
    samples of all ranks and each rank's state (through JSON, as a checkpoint would keep it)."""
    samples, states = [], []
    for rank in range(world):
        loader = make(blend, rank, world, workers, **kwargs)
        if state is not None:
            loader.load_state_dict(copy.deepcopy(state))
        samples += consume(loader, batches)[0]
        states.append(json.loads(json.dumps(loader.state_dict())))
    return samples, states


def assert_exactly_one_pass(samples, epochs, bad=()):
    """Per dataset and epoch: every sample exactly once (``bad``: (dataset, key) never)."""
    for d, size in enumerate(SIZES):
        expected = {sample_key(i) for i in range(size)} - {key for dd, key in bad if dd == d}
        for e in epochs:
            seen = collections.Counter(key for dd, ee, key in samples if (dd, ee) == (d, e))
            repeated = sorted(k for k, n in seen.items() if n > 1)
            missing = sorted(expected - set(seen))
            assert not repeated and not missing, f"dataset {d} epoch {e}: repeated {repeated}, missing {missing}"
            assert set(seen) == expected


def batches_after(world):
    """Batches per rank after the change: all ranks together read ~480 samples, over two epochs of both datasets
    (~290 and ~90 at the 2:1 blend) with room for the readers' spread, so every reader finishes epochs 0 and 1."""
    return 120 // world


@pytest.mark.parametrize("old,new,stop", [
    ((2, 2), (3, 2), 7),  # DP 2 -> 3, two workers each
    ((2, 2), (3, 3), 11),  # ... and more workers; dataset b's readers already in epoch 1
    ((2, 2), (1, 0), 4),  # DP 2 -> 1, loading in the main process
    ((1, 2), (2, 1), 9),
])
def test_position_moves_to_another_layout_exactly(blend, old, new, stop):
    before, states = run_layout(blend, old[0], old[1], stop)
    merged = merge_loader_states(list(reversed(states)))  # any order
    assert merged["kind"] == "global" and merged["written_by"] == {"world_size": old[0], "num_workers": old[1]}
    assert any(p["remaining"] for p in merged["position"])  # the change really happens mid-epoch
    after, _ = run_layout(blend, new[0], new[1], batches_after(new[0]), json.loads(json.dumps(merged)))
    assert_exactly_one_pass(before + after, epochs=(0, 1))


def test_slots_in_different_epochs_are_accounted(blend):
    """With dataset b's readers in epochs 0 and 1 at the change, both epochs stay exact."""
    before, states = run_layout(blend, 2, 2, 11)
    epochs = {slot["positions"][1][0] for s in states for slot in s["slots"]}
    assert epochs == {0, 1}, "the scenario needs readers of dataset b in two epochs"
    after, _ = run_layout(blend, 3, 2, batches_after(3), merge_loader_states(states))
    assert_exactly_one_pass(before + after, epochs=(0, 1))


def test_skipped_bad_sample_leaves_the_good_ones_exact(blend, tmp_path):
    """skip_bad_samples: a damaged sample of dataset b is never served, before or after the change, and the good
    ones stay exact (the bad one is met and counted again after the change: docs, "Elastic data position")."""
    damaged = tmp_path / "b"
    shutil.copytree(blend[1][0], damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    shard = damaged / manifest["shards"][1]["file"]  # samples 7..13
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    with wds.TarWriter(str(shard), mtime=0) as writer:
        for s in samples:
            short = s["__key__"] == sample_key(9)  # 8 tokens instead of seq_length + 1
            writer.write({"__key__": s["__key__"],
                          "tokens.npy": encode_tokens(np.arange(1, 9, dtype=np.uint16)) if short else s["tokens.npy"]})
    manifest["shards"][1].update(sha256=sha256_file(shard), num_bytes=shard.stat().st_size)
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    datasets = [blend[0], (damaged, 1.0)]
    before, states = run_layout(datasets, 2, 2, 11, skip_bad_samples=True)
    after, _ = run_layout(datasets, 3, 2, batches_after(3), merge_loader_states(states), skip_bad_samples=True)
    assert sum(s["bad_samples"] for s in states) >= 1
    assert_exactly_one_pass(before + after, epochs=(0, 1), bad=[(1, sample_key(9))])


def test_dp_2_to_1_to_2(blend):
    first, states = run_layout(blend, 2, 2, 5)
    second, states = run_layout(blend, 1, 2, 6, merge_loader_states(states))
    third, _ = run_layout(blend, 2, 2, batches_after(2), merge_loader_states(states))
    assert_exactly_one_pass(first + second + third, epochs=(0, 1))


def test_unchanged_layout_resume_is_bitwise_the_same_stream(blend):
    """A rank state resumes exactly on its own layout - also after an elastic resume (its record is kept)."""
    _, states = run_layout(blend, 2, 2, 6)
    merged = merge_loader_states(states)
    reference = make(blend, 1, 3, 2)
    reference.load_state_dict(merged)
    _, ref_batches = consume(reference, 14)
    loader = make(blend, 1, 3, 2)
    loader.load_state_dict(merged)
    consume(loader, 5)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = make(blend, 1, 3, 2)
    assert resumed.same_layout(state) and not make(blend, 1, 2, 2).same_layout(state)
    resumed.load_state_dict(state)
    _, tail = consume(resumed, 9)
    for a, b in zip(ref_batches[5:], tail, strict=True):
        assert a["key"] == b["key"]
        for name in ("tokens", "dataset", "epoch"):
            assert torch.equal(a[name], b[name])
    # the resumed loader's record is the uninterrupted one's: the same state at the same point
    assert resumed.state_dict() == reference.state_dict()


def test_a_fresh_run_records_its_consumption(blend):
    """Fresh run: the merged record lists what was consumed - the remaining ranges plus the samples seen make
    the epoch."""
    before, states = run_layout(blend, 2, 2, 3)
    merged = merge_loader_states(states)
    for d, p in enumerate(merged["position"]):
        remaining = sum(b - a for a, b in dict(p["remaining"]).get(0, [[0, SIZES[d]]]))
        assert remaining == SIZES[d] - sum(1 for dd, e, _ in before if (dd, e) == (d, 0))


def test_range_helpers():
    seen = ConsumedSet()
    for p in (5, 3, 4, 9, 0, 1, 2, 8):
        seen.add(p)
    assert seen.ranges() == [(0, 6), (8, 10)]
    with pytest.raises(DataError, match="twice"):
        seen.add(4)
    assert subtract([(0, 10), (12, 20)], [(2, 3), (9, 13), (19, 25)]) == [(0, 2), (3, 9), (13, 19)]
    assert union([(5, 7), (0, 2)], [(2, 3), (6, 9)]) == [(0, 3), (5, 9)]
    assert [take_positions([(0, 4), (10, 13)], part, 2) for part in range(2)] == [[(0, 3)], [(3, 4), (10, 13)]]
    assert [take_positions([(0, 4), (10, 13)], part, 3) for part in range(3)] == [[(0, 2)], [(2, 4)], [(10, 13)]]


def test_state_written_before_positions_resumes_exactly_but_moves_only_after_its_epochs(blend):
    """A version-1 state (no position record) still resumes bit-identically on its layout; what its readers consumed
    of their current epochs is unknown, so merging refuses until every reader has passed them."""
    loader = make(blend, 0, 1, 2)
    consume(loader, 4)
    state = loader.state_dict()
    old = {k: v for k, v in state.items() if k not in ("kind", "position")} | {"version": 1}
    reference = make(blend, 0, 1, 2)
    reference.load_state_dict(state)
    resumed = make(blend, 0, 1, 2)
    resumed.load_state_dict(old)
    for a, b in zip(consume(reference, 6)[1], consume(resumed, 6)[1], strict=True):
        assert a["key"] == b["key"] and torch.equal(a["tokens"], b["tokens"])
    with pytest.raises(DataError, match="before data positions were recorded.*dataset 0"):
        merge_loader_states([resumed.state_dict()])
    consume(resumed, 60)  # every reader past the epochs it was in at the resume
    assert merge_loader_states([resumed.state_dict()])["kind"] == "global"


# --- bad input ------------------------------------------------------------------------------------------------
def _tamper(state, path, value):
    state = copy.deepcopy(state)
    target = state
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return state


@pytest.fixture(scope="module")
def saved(blend):
    return run_layout(blend, 2, 2, 7)[1]


@pytest.mark.parametrize("path,value,field", [
    (("position", 1, "consumed"), [[0, [[5, 3]]]], r"position\[1\]\.consumed\[0\] \(epoch 0\) range 0"),
    (("position", 0, "consumed"), [[0, [[0, 500]]]], r"position\[0\]\.consumed.*96 samples"),
    (("position", 0, "base", "num_samples"), 95, r"position\[0\]\.base\.num_samples"),
    (("position", 0, "base", "complete_before"), -1, r"position\[0\]\.base\.complete_before"),
    (("position",), [], "position: expected one entry per dataset"),
    (("slots", 0, "positions", 1), ["x", 0], r"slots\[0\]\.positions\[1\]\[0\] \(epoch\)"),
    (("slots",), [None], "slots: expected a list of 2"),
    (("next_slot",), 5, "next_slot"),
    (("bad_samples",), "many", "bad_samples"),
    (("kind",), "partial", "kind"),
])
def test_tampered_rank_state_is_refused_naming_the_field(blend, saved, path, value, field):
    bad = _tamper(saved[0], path, value)
    with pytest.raises(DataError, match=field):
        make(blend, 0, 2, 2).load_state_dict(bad)
    if path[0] != "kind":
        with pytest.raises(DataError, match=field):
            merge_loader_states([bad, saved[1]])


@pytest.mark.parametrize("path,value,field", [
    (("position", 1, "remaining"), [[0, [[3, 9], [8, 10]]]], r"position\[1\]\.remaining\[0\] \(epoch 0\) range 1"),
    (("position", 1, "remaining"), [[0, []], [0, []]], "epoch 0 listed twice"),
    (("position", 0), "all", r"position\[0\]: expected a mapping"),
    (("position", 1, "complete_before"), 2, r"position\[1\]\.remaining: lists epochs \[0.*before complete_before"),
    (("seed",), 18, "seed: state has 18, loader has 17"),
])
def test_tampered_global_state_is_refused_naming_the_field(blend, saved, path, value, field):
    bad = _tamper(merge_loader_states(saved), path, value)
    with pytest.raises(DataError, match=field):
        make(blend, 0, 3, 1).load_state_dict(bad)


def test_merge_needs_every_rank_of_one_run(blend, saved):
    with pytest.raises(DataError, match=r"one state of each rank 0\.\.1.*got ranks \[0\]"):
        merge_loader_states([saved[0]])
    with pytest.raises(DataError, match="differs from the first one in.*seed"):
        merge_loader_states([saved[0], _tamper(saved[1], ("seed",), 3)])
    with pytest.raises(DataError, match="per-rank state"):
        merge_loader_states([merge_loader_states(saved)])


# --- the trainer's wiring (real Trainer, gloo ranks) ---------------------------------------------------------------
def _train_rank(rank, world_size, config):
    from largelm.config import load_config
    from largelm.train.trainer import Trainer

    trainer = Trainer(load_config(config))
    try:
        start = trainer.step
        restored = trainer.loader.state_dict()
        trainer.fit()
        return {"start": start, "restored": restored, "after": trainer.loader.state_dict()}
    finally:
        trainer.close()


@pytest.mark.slow
def test_trainer_checkpoint_resumes_on_another_data_parallel_size(tmp_path, tokenizer_path, shard_dir,
                                                                  shard_seq_length):
    """DP=2 saves every rank's loader state and, with rank 0's, the merged layout-independent position; a DP=1
    run of the real Trainer resumes from it (ZeRO-0 fp32: the engine state does not depend on the DP size) and
    reads only samples of the epoch that the DP=2 run had not consumed (the Trainer built directly, so without the
    launcher's preflight; ``checkpoint.reshard_on_resume`` lets it take the resharded path)."""
    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length, model={"vocab_size": 1000},
                         data={"num_workers": 0, "valid": []},  # daemonic ranks: no DataLoader workers
                         parallel={"zero_stage": 0}, train={"steps": 2, "grad_accum_steps": 1},
                         checkpoint={"save_interval": 2}, logging={"tensorboard_dir": None, "progress_bar": False,
                                                                   "peak_tflops_per_rank": 1.0})
    run_ranks(_train_rank, 2, str(config), timeout_s=300)
    step_dir = tmp_path / "ckpt" / "step_00000002"
    data = [safe_torch_load(step_dir / f"trainer_state_rank{r:05d}.pt")["data"] for r in range(2)]
    assert "global" not in data[1]
    merged = data[0].pop("global")
    assert merged == merge_loader_states(data)

    raw = yaml.safe_load(config.read_text())
    raw["train"]["steps"] = 3
    raw["checkpoint"]["reshard_on_resume"] = True  # (the trainer refuses another layout without it)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    (resumed,) = run_ranks(_train_rank, 1, str(config), timeout_s=300)
    assert resumed["start"] == 2
    assert [p["base"] for p in resumed["restored"]["position"]] == merged["position"]

    def remaining(position, epoch=0):
        size = position["num_samples"]
        return {i for a, b in dict(position["remaining"]).get(epoch, [[0, size]]) for i in range(a, b)}

    before = remaining(merged["position"][0])
    after = remaining(merge_loader_states([resumed["after"]])["position"][0])
    # the DP=1 step read 4 samples (micro-batch 4), all from what the DP=2 run left of epoch 0
    assert after < before and len(before - after) == 4

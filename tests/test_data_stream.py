import collections
import json

import numpy as np
import pytest
import torch

from largelm.data import build_loader, read_manifest
from largelm.data.blend import BlendSchedule
from largelm.data.format import sample_key
from largelm.data.shards import ShardRange, take_part


def take(loader, n):
    """First ``n`` batches of a (fresh) iteration, as lists of keys, plus the batches themselves."""
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return [b["key"] for b in batches], batches


SEQ = 32  # seq_length of the shared shard_dir fixture (checked below)


def test_fixture_seq_length(shard_dir, shard_seq_length):
    assert read_manifest(shard_dir / "train").seq_length == shard_seq_length == SEQ


def synthetic_tokens(key, seq_length=8, vocab_size=1000):
    i = int(key[1:])
    return (i * 31 + np.arange(seq_length + 1)) % (vocab_size - 1) + 1


@pytest.fixture(scope="module")
def synth(make_token_shards, tmp_path_factory):
    """96 samples of 9 tokens in 10 shards (the last one short) and a second dataset of 40 samples."""
    root = tmp_path_factory.mktemp("synthetic")
    return make_token_shards(root / "a", 96), make_token_shards(root / "b", 40, samples_per_shard=7)


def test_take_part_covers_everything_once():
    ranges = [ShardRange("x", 0, 10), ShardRange("y", 0, 3), ShardRange("z", 0, 7)]
    for parts in (1, 2, 3, 7, 20, 25):
        pieces = [take_part(ranges, p, parts) for p in range(parts)]
        flat = [(r.path, i) for piece in pieces for r in piece for i in range(r.start, r.stop)]
        assert flat == [(r.path, i) for r in ranges for i in range(r.start, r.stop)]
        sizes = [sum(r.size for r in piece) for piece in pieces]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("split", ["train", "valid"])
def test_validation_pass_covers_every_sample_once_across_ranks_and_workers(shard_dir, split):
    manifest = read_manifest(shard_dir / split)
    seen = collections.Counter()
    for rank in range(2):
        loader = build_loader([(shard_dir / split, 1.0)], SEQ, 8, rank=rank, world_size=2,
                              num_workers=2, infinite=False)
        keys = [k for b in loader for k in b["key"]]
        assert len(keys) == loader.num_samples
        seen.update(keys)
        assert [k for b in loader for k in b["key"]] == keys  # every pass is the same ordered pass
    assert set(seen) == {sample_key(i) for i in range(manifest.num_samples)}
    assert set(seen.values()) == {1}


def test_training_epochs_cover_every_sample_once(synth):
    # 96 samples / (2 ranks x 2 workers) = 24 per reader = 6 batches of 4: one epoch = 12 batches per rank.
    epochs = {0: collections.Counter(), 1: collections.Counter()}
    orders = {}
    for rank in range(2):
        loader = build_loader([(synth[0], 1.0)], 8, 4, rank=rank, world_size=2, num_workers=2, shuffle_buffer=10,
                              seed=3)
        keys, batches = take(loader, 24)
        for b in batches:
            assert b["tokens"].dtype == torch.long and b["tokens"].shape == (4, 9)
            for key, row in zip(b["key"], b["tokens"]):
                assert row.tolist() == synthetic_tokens(key).tolist()
        flat = [k for batch in keys for k in batch]
        epochs[0].update(flat[:48])
        epochs[1].update(flat[48:])
        orders[rank] = flat
    for counter in epochs.values():
        assert set(counter) == {sample_key(i) for i in range(96)} and set(counter.values()) == {1}
    assert orders[0][:48] != orders[0][48:]  # the second epoch is reshuffled


def test_same_seed_same_order_different_seed_different(shard_dir):
    def keys(seed, workers):
        loader = build_loader([shard_dir / "train"], SEQ, 8, num_workers=workers, shuffle_buffer=50, seed=seed)
        return [k for batch in take(loader, 12)[0] for k in batch]

    first = keys(7, 2)
    assert keys(7, 2) == first
    assert keys(8, 2) != first
    assert len(set(first)) == len(first)
    assert keys(7, 0) != first  # the order depends on the worker count (a resume checks it)
    unshuffled = [sample_key(i) for i in range(len(first))]
    assert first != unshuffled


@pytest.mark.parametrize("workers,stop", [(2, 7), (2, 12), (0, 5), (3, 16)])
def test_resume_mid_epoch_yields_the_same_remaining_batches(synth, workers, stop):
    def make():
        return build_loader([(synth[0], 1.0)], 8, 4, rank=1, world_size=2, num_workers=workers, shuffle_buffer=10,
                            seed=11)

    reference, _ = take(make(), stop + 20)  # crosses epoch boundaries
    loader = make()
    head, _ = take(loader, stop)
    assert head == reference[:stop]
    state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
    assert state["consumed_batches"] == stop
    resumed = make()
    resumed.load_state_dict(state)
    tail, _ = take(resumed, 20)
    assert tail == reference[stop:]
    assert resumed.state_dict()["consumed_batches"] == stop + 20


def test_resume_on_real_shards_with_blending(shard_dir):
    # Two real splits blended (both share one tokenizer); workers and shuffle on.
    datasets = [(shard_dir / "train", 2.0), (shard_dir / "valid", 1.0)]

    def make():
        return build_loader(datasets, SEQ, 8, num_workers=2, shuffle_buffer=100, seed=5)

    reference, ref_batches = take(make(), 30)
    loader = make()
    take(loader, 9)
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    tail, tail_batches = take(resumed, 21)
    assert tail == reference[9:]
    for a, b in zip(ref_batches[9:], tail_batches):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["dataset"], b["dataset"])


def test_iterating_again_continues_where_it_stopped(synth):
    loader = build_loader([synth[0]], 8, 4, num_workers=0, shuffle_buffer=10, seed=1)
    reference, _ = take(build_loader([synth[0]], 8, 4, num_workers=0, shuffle_buffer=10, seed=1), 10)
    first, _ = take(loader, 4)
    second, _ = take(loader, 6)
    assert first + second == reference


def test_loader_leaves_global_rng_alone(synth):
    """Training RNG (dropout, init) must not depend on when or how often the loader is iterated."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for workers in (0, 2):
        take(build_loader([synth[0]], 8, 4, num_workers=workers, shuffle_buffer=10), 3)
    assert torch.equal(torch.get_rng_state(), before)


def test_blend_ratio_follows_weights(synth):
    loader = build_loader([(synth[0], 3.0), (synth[1], 1.0)], 8, 16, num_workers=0, shuffle_buffer=10, seed=2)
    _, batches = take(loader, 60)
    sources = torch.cat([b["dataset"] for b in batches])
    share = (sources == 0).float().mean().item()
    assert abs(share - 0.75) < 0.05
    expected = BlendSchedule([3.0, 1.0], seed=2, rank=0, slot=0).counts(len(sources))
    assert torch.bincount(sources, minlength=2).tolist() == expected
    for b in batches:  # each sample really comes from the dataset it is labelled with
        for key, d, row in zip(b["key"], b["dataset"], b["tokens"]):
            if d == 1:
                assert int(key[1:]) < 40
            assert row.tolist() == synthetic_tokens(key).tolist()


def test_workers_send_numpy_and_the_loader_yields_tensors(shard_dir, monkeypatch):
    """Workers return numpy arrays (pickled by value: no shared-memory segment per tensor, the P4 data-path fix);
    the loader hands the training loop int64 tensors, the same batches whatever the worker count."""
    import largelm.data.loader as loader_module

    seen = []
    collate = loader_module.collate_samples
    monkeypatch.setattr(loader_module, "collate_samples", lambda items: seen.append(collate(items)) or seen[-1])
    ordered = [build_loader([(shard_dir / "valid", 1.0)], SEQ, 4, num_workers=w, infinite=False) for w in (0, 2)]
    in_process, workers = list(ordered[0]), list(ordered[1])
    assert seen and all(isinstance(b["tokens"], np.ndarray) and isinstance(b["dataset"], np.ndarray)
                        for b in seen if "tokens" in b)
    for batches in (in_process, workers):
        assert all(b["tokens"].dtype == torch.int64 and b["dataset"].dtype == torch.int64 for b in batches)

    def samples(batches):
        return sorted((k, tuple(t)) for b in batches for k, t in zip(b["key"], b["tokens"].tolist()))

    assert samples(in_process) == samples(workers)

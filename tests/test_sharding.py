import torch

from largelm.parallel.sharding import shard_tensor, unshard_tensors


def test_shard_unshard_round_trip_with_stride():
    full = torch.arange(48.0).reshape(12, 4)
    for size in (1, 2, 3):
        for stride in (1, 2):
            if 12 % (size * stride):
                continue
            shards = [shard_tensor(full, r, size, 0, stride) for r in range(size)]
            assert all(s.shape[0] == 12 // size for s in shards)
            assert torch.equal(unshard_tensors(shards, 0, stride), full)


def test_stride_two_gives_each_rank_its_gate_and_up_rows():
    gate, up = torch.zeros(4, 3), torch.ones(4, 3)
    fc1 = torch.cat([gate, up])  # the fused SwiGLU layout [gate; up]
    rank0 = shard_tensor(fc1, 0, 2, 0, stride=2)
    assert torch.equal(rank0, torch.cat([gate[:2], up[:2]]))


def test_indivisible_shape_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="does not divide"):
        shard_tensor(torch.zeros(5, 2), 0, 2, 0)

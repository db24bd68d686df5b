"""largelm.parallel.cpu_compat: scoped, idempotent, reversible; the CPU RNG tracker behaves like
megatron's CUDA one (per-TP-rank streams, default stream restored, recompute replays dropout)."""

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.fusions import fused_softmax
from megatron.core.tensor_parallel import random as mcore_random

from largelm.parallel.cpu_compat import (
    CpuRNGStatesTracker,
    disable_cpu_compat,
    enable_cpu_compat,
    is_cpu_compat_enabled,
    model_parallel_manual_seed,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is inactive with CUDA")


@pytest.fixture
def fresh_compat():
    """Start uninstalled; leave it installed as before (other tests in this process rely on it)."""
    was_enabled = is_cpu_compat_enabled()
    disable_cpu_compat()
    yield
    disable_cpu_compat()
    if was_enabled:
        enable_cpu_compat()


def test_enable_installs_patches_once_and_disable_restores(fresh_compat):
    original_current_device = torch.cuda.current_device
    original_mask = fused_softmax.get_default_causal_mask
    original_tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    with pytest.raises((AssertionError, RuntimeError)):  # the genuine CUDA call fails on this machine
        torch.cuda.current_device()

    assert enable_cpu_compat() is True
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, CpuRNGStatesTracker)

    # idempotent: a second install changes nothing (the same tracker object survives with its states)
    tracker.add("probe", 99)
    assert enable_cpu_compat() is True
    assert tensor_parallel.get_cuda_rng_tracker() is tracker
    assert "probe" in tracker.get_states()

    disable_cpu_compat()
    assert torch.cuda.current_device is original_current_device
    assert fused_softmax.get_default_causal_mask is original_mask
    assert mcore_random._CUDA_RNG_STATE_TRACKER is original_tracker
    disable_cpu_compat()  # second disable is harmless
    assert not is_cpu_compat_enabled()


def test_is_a_noop_when_cuda_is_available(fresh_compat, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    original_current_device = torch.cuda.current_device
    original_mask = fused_softmax.get_default_causal_mask
    original_tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    assert enable_cpu_compat() is False
    assert torch.cuda.current_device is original_current_device
    assert fused_softmax.get_default_causal_mask is original_mask
    assert mcore_random._CUDA_RNG_STATE_TRACKER is original_tracker
    assert not is_cpu_compat_enabled()


def test_causal_mask_masks_future_positions(fresh_compat):
    enable_cpu_compat()
    mask = fused_softmax.get_default_causal_mask(5)
    assert mask.dtype == torch.bool and mask.device.type == "cpu"
    i, j = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    assert torch.equal(mask, j > i)  # True = masked out, as in megatron


def _draw_in_fork(seed, tp_rank, n=8):
    model_parallel_manual_seed(seed, tp_rank=tp_rank)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        return torch.rand(n)


def test_fork_gives_each_tp_rank_its_megatron_stream(fresh_compat):
    seed = 1234
    draws = [_draw_in_fork(seed, r) for r in range(2)]
    assert not torch.equal(draws[0], draws[1])
    for r, drawn in enumerate(draws):  # megatron: tensor-model-parallel seed = seed + 2718 + tp_rank
        expected = torch.rand(8, generator=torch.Generator().manual_seed(seed + 2718 + r))
        assert torch.equal(drawn, expected)


def test_default_stream_is_the_data_parallel_seed_and_is_restored_after_fork(fresh_compat):
    seed = 77
    model_parallel_manual_seed(seed, tp_rank=1)
    before = torch.get_rng_state()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream did not move
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second)  # the forked stream continues where it stopped
    # the default (data-parallel) stream is seeded with `seed` on every TP rank
    assert torch.equal(torch.rand(4), torch.rand(4, generator=torch.Generator().manual_seed(seed)))


def test_nested_forks_restore_each_stream(fresh_compat):
    model_parallel_manual_seed(5, tp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    outside = torch.get_rng_state()
    with tracker.fork():  # model-parallel stream
        a1 = torch.rand(3)
        with tracker.fork(mcore_random.get_data_parallel_rng_tracker_name()):
            torch.rand(3)
        a2 = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside)
    expected = torch.rand(6, generator=torch.Generator().manual_seed(5 + 2718))
    assert torch.equal(torch.cat([a1, a2]), expected)  # inner fork did not disturb the outer stream


def test_model_parallel_manual_seed_is_reproducible(fresh_compat):
    a = _draw_in_fork(42, 0), torch.rand(5)
    b = _draw_in_fork(42, 0), torch.rand(5)
    c = _draw_in_fork(43, 0), torch.rand(5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


def test_activation_recompute_replays_dropout_on_cpu(fresh_compat):
    """megatron's checkpoint() saves and restores RNG states through the patched
    _get/_set_cuda_rng_state; recompute must reproduce the forward's dropout masks exactly."""
    model_parallel_manual_seed(3, tp_rank=0)
    w = torch.randn(16, 16, requires_grad=True)
    x = torch.randn(4, 16)

    def block(inp):
        h = torch.nn.functional.dropout(inp @ w, p=0.5, training=True)  # default stream
        with tensor_parallel.get_cuda_rng_tracker().fork():  # tracked stream
            h = torch.nn.functional.dropout(h, p=0.5, training=True)
        return h.tanh()

    state = mcore_random._get_all_rng_states()
    block(x).sum().backward()
    plain = w.grad.clone()
    w.grad = None
    mcore_random._set_all_rng_states(*state)
    tensor_parallel.checkpoint(block, False, x.requires_grad_()).sum().backward()
    assert torch.equal(w.grad, plain)


def test_checkpointed_rng_state_carries_the_tracker_or_fails(fresh_compat, monkeypatch):
    """``capture_rng_state`` (what a checkpoint stores) includes the tracked model-parallel stream, so a resume
    continues it exactly; a tracker that cannot report its states fails the capture instead of silently leaving
    them out (which would make the resume quietly inexact)."""
    from largelm.train.rng import capture_rng_state, restore_rng_state

    def tracked_draw():
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return torch.rand(8)

    model_parallel_manual_seed(5, tp_rank=0)
    state = capture_rng_state()
    expected = tracked_draw()
    model_parallel_manual_seed(6, tp_rank=0)  # the streams move on elsewhere
    restore_rng_state(state)
    assert torch.equal(tracked_draw(), expected)

    def unavailable():
        raise RuntimeError("tracker states unavailable")

    monkeypatch.setattr(tensor_parallel.get_cuda_rng_tracker(), "get_states", unavailable)
    with pytest.raises(RuntimeError, match="tracker states unavailable"):
        capture_rng_state()

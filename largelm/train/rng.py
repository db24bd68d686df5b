"""Capture and restore every RNG a training step touches, per rank, for bit-exact resume."""

from __future__ import annotations

import random

import torch


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    try:  # megatron's model-parallel RNG tracker (dropout inside TP regions)
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["megatron_tracker"] = get_cuda_rng_tracker().get_states()
    except Exception:  # tracker not initialised (e.g. unit tests without megatron)
        pass
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    if "megatron_tracker" in state:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["megatron_tracker"])

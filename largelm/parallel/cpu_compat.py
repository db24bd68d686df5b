"""Run megatron-core on a machine without CUDA: the whole compatibility layer, in one place.

megatron-core 0.16.1 is written for GPUs. Its *math* runs on CPU unchanged, but a handful of calls
assume a CUDA device exists. ``enable_cpu_compat()`` replaces exactly those, and only when
``torch.cuda.is_available()`` is False; on a GPU machine it returns without touching anything, so
the GPU/NCCL path is megatron-core as shipped. Each patch is listed in ``PATCHES`` and explained in
docs/design.md ("megatron-core on CPU"):

1. ``torch.cuda.current_device`` returns ``torch.device("cpu")``. megatron allocates with
   ``device=torch.cuda.current_device()`` (global memory buffer used by attention, tensor-parallel
   all-gather/reduce-scatter outputs, embeddings); without CUDA that call raises.
2. megatron's causal mask builder (``get_default_causal_mask``, used by the unfused softmax when
   ``attention_mask`` is None) hard-codes ``device="cuda"``; we supply the same mask on CPU.
3. The model-parallel RNG tracker is a ``CpuRNGStatesTracker``: megatron's ``CudaRNGStatesTracker``
   whose named states are CPU generator states, so ``fork()`` gives tensor-parallel-distinct dropout
   streams exactly as the CUDA tracker does on GPU.
4. megatron's ``_get_cuda_rng_state``/``_set_cuda_rng_state`` (used by activation recompute to
   replay dropout) read/write the CPU generator instead of a CUDA one.

``model_parallel_manual_seed(seed)`` is the one seeding entry point for both devices.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core.fusions import fused_softmax
from megatron.core.tensor_parallel import random as mcore_random

from largelm.parallel.patches import Patch

_MC = "megatron-core 0.16.1"
_WHEN = "no CUDA (torch.cuda.is_available() is False): every CPU run; never on a GPU"
_TEST = "tests/test_cpu_compat.py"

PATCHES = (
    Patch(
        name="cpu_current_device", library=_MC, scope="process", target="torch.cuda.current_device",
        replaces="the CUDA device index megatron allocates on (memory buffer, TP collectives' outputs, embeddings)",
        why="raises without CUDA; returns torch.device('cpu') instead", when=_WHEN,
        test=f"{_TEST}::test_enable_installs_patches_once_and_disable_restores",
    ),
    Patch(
        name="cpu_causal_mask", library=_MC, scope="process",
        target="megatron.core.fusions.fused_softmax.get_default_causal_mask",
        replaces="the unfused softmax's causal mask, built with device='cuda'",
        why="fails without CUDA; the same mask (True = masked) on the CPU", when=_WHEN,
        test=f"{_TEST}::test_causal_mask_masks_future_positions",
    ),
    Patch(
        name="cpu_rng_tracker", library=_MC, scope="process",
        target="megatron.core.tensor_parallel.random._CUDA_RNG_STATE_TRACKER (a CpuRNGStatesTracker)",
        replaces="CudaRNGStatesTracker, whose named states and fork() use the CUDA generator",
        why="tensor-parallel dropout streams need the CPU generator on CPU", when=_WHEN,
        test=f"{_TEST}::test_fork_gives_each_tp_rank_its_megatron_stream",
    ),
    Patch(
        name="cpu_rng_state", library=_MC, scope="process",
        target="megatron.core.tensor_parallel.random._get_cuda_rng_state, _set_cuda_rng_state",
        replaces="read/write the CUDA generator state for activation recompute",
        why="recompute must replay dropout from the CPU generator", when=_WHEN,
        test=f"{_TEST}::test_activation_recompute_replays_dropout_on_cpu",
    ),
)

# Originals, kept so disable_cpu_compat() can undo the install (tests use this; training never does).
_saved: Optional[dict] = None


def cuda_in_use() -> bool:
    """True when this process computes on a GPU; then the compat layer stays out of the way."""
    return torch.cuda.is_available()


def is_cpu_compat_enabled() -> bool:
    return _saved is not None


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    # Same mask as megatron.core.transformer.utils.get_default_causal_mask (True = masked out),
    # built on the CPU.
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    # torch.get_rng_state() already returns a copy, so ``clone`` needs no extra work.
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=-1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron's RNG-states tracker with CPU generator states in place of CUDA ones.

    On GPU, dropout draws from the default CUDA generator and ``fork(name)`` temporarily swaps a
    named state into it. On CPU, dropout draws from the default CPU generator, so that is the one we
    swap. Book-keeping (``states_``, ``seeds_``, ``get_states``/``set_states``, ``reset``) is the
    parent's; only the two methods that touch the CUDA generator are replaced.
    """

    def __init__(self):
        super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=False)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        # A private generator yields the seeded state without disturbing the default generator.
        self.states_[name] = torch.Generator(device="cpu").manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        outer_state = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != "default-rng":  # nested fork: remember where the outer stream had got to
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f"current state name {self._current_state_name} is not the same as the desired "
                    f"state name {name}."
                )
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name


def enable_cpu_compat() -> bool:
    """Install the CPU compatibility patches. Idempotent.

    Returns True when the patches are active (no CUDA), False when CUDA is available (nothing is
    changed). Call it before building or running a megatron-core model; ``build_gpt_model`` and
    ``model_parallel_manual_seed`` call it for you.
    """
    global _saved
    if cuda_in_use():
        return False
    if _saved is not None:
        return True
    _saved = {
        "current_device": torch.cuda.current_device,
        "causal_mask": fused_softmax.get_default_causal_mask,
        "tracker": mcore_random._CUDA_RNG_STATE_TRACKER,
        "tracker_initialized": mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED,
        "get_rng_state": mcore_random._get_cuda_rng_state,
        "set_rng_state": mcore_random._set_cuda_rng_state,
    }
    torch.cuda.current_device = _cpu_current_device
    fused_softmax.get_default_causal_mask = _cpu_default_causal_mask
    # Marking the tracker initialised makes megatron's get_cuda_rng_tracker()/initialize_rng_tracker()
    # return ours instead of building a CUDA one.
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    return True


def disable_cpu_compat() -> None:
    """Undo ``enable_cpu_compat`` (restores every original). A no-op when nothing is installed."""
    global _saved
    if _saved is None:
        return
    torch.cuda.current_device = _saved["current_device"]
    fused_softmax.get_default_causal_mask = _saved["causal_mask"]
    mcore_random._CUDA_RNG_STATE_TRACKER = _saved["tracker"]
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = _saved["tracker_initialized"]
    mcore_random._get_cuda_rng_state = _saved["get_rng_state"]
    mcore_random._set_cuda_rng_state = _saved["set_rng_state"]
    _saved = None


def model_parallel_manual_seed(seed: int, tp_rank: Optional[int] = None) -> None:
    """Seed every RNG stream megatron uses, on GPU or CPU, with megatron's semantics.

    On GPU this is ``megatron.core.tensor_parallel.model_parallel_cuda_manual_seed``. On CPU the same
    function runs against the CPU tracker, and the default CPU generator is seeded with ``seed``
    because it plays the role of the default CUDA generator (non-tensor-parallel dropout). Streams:

    * default / ``data-parallel-rng``: ``seed`` (identical across tensor-parallel ranks),
    * ``model-parallel-rng``: ``seed + 2718 + tp_rank`` (distinct per tensor-parallel rank),
    * ``expert-parallel-rng``: ``seed + 1024 + 100 * ep_rank + etp_rank``.

    ``tp_rank`` defaults to megatron's parallel_state (which must then be initialised).
    """
    if enable_cpu_compat():
        torch.manual_seed(seed)
    # ep/etp ranks are only read from parallel_state when it is initialised; pass 0 otherwise so a
    # caller may seed before (or without) model-parallel groups by giving tp_rank.
    from megatron.core import parallel_state

    ep = None if parallel_state.model_parallel_is_initialized() else 0
    mcore_random.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=ep, etp_rank=ep)

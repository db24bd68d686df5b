"""Helpers for tests that need process groups: one in-process rank, or N spawned gloo ranks (and ``randomize``
for the models built there; the ``tp1`` fixture in conftest.py holds a one-rank parallel state for a module).

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes (torch.multiprocessing, spawn
start method) with the launcher environment a real run has (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free port), calls ``fn(rank, world_size,
*args)`` in each and returns the per-rank results in rank order. A rank's exception is re-raised
in the test with that rank's traceback; ranks still running at the timeout are killed. ``fn`` must
be a module-level function (spawn pickles it by name). Return plain Python values (floats, lists,
dicts): tensors would travel through shared memory owned by a rank that is about to exit.
It is ``largelm.convert.spawn.run_ranks`` (which also gives the ranks ``CUDA_VISIBLE_DEVICES=""``
and ``DS_ACCELERATOR=cpu`` and ignores User/DeprecationWarnings in them, as pytest's filterwarnings does here).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from largelm.convert import spawn
from largelm.convert.spawn import RankFailed, free_port

__all__ = ["RankFailed", "free_port", "randomize", "run_ranks", "single_rank_parallel_state"]


@contextlib.contextmanager
def single_rank_parallel_state(tensor_parallel: int = 1, pipeline_parallel: int = 1) -> Iterator[None]:
    """World of one gloo rank (tcp on a free port) plus megatron parallel_state; torn down after."""
    from largelm.parallel import groups

    groups.init_distributed("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        groups.init_model_parallel(tensor_parallel, pipeline_parallel)
        yield
    finally:
        groups.destroy()


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Add N(0, std^2) noise to every parameter (in place; returns ``model``). Megatron's 0.02-std init gives
    near-uniform logits, where a wrong weight mapping could hide inside the tolerance; large random weights make
    every tensor matter."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s state dict without Transformer Engine's ``_extra_state`` entries."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _one_thread(rank: int, world_size: int, fn: Callable, *args: Any) -> Any:
    torch.set_num_threads(1)  # the test machine is shared and small
    return fn(rank, world_size, *args)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0) -> list[Any]:
    """``largelm.convert.spawn.run_ranks`` (the converters' local-rank runner) with one torch thread
    per rank, the ranks' output left on the terminal (pytest captures it) and a timeout. Raises its
    ``RankFailed`` naming each failed rank with its traceback (only the message for a ``ConversionError``), or
    the ranks that did not report."""
    return spawn.run_ranks(_one_thread, world_size, fn, *args, timeout_s=timeout_s, verbose=True)


def rel_diff(a: float, b: float) -> float:
    """|a - b| relative to the reference value b."""
    return abs(a - b) / max(abs(b), 1e-12)


def assert_steps_match(name: str, per_rank: list[dict], ref: dict, steps: int, loss_rtol: float,
                       norm_rtol: float, ref_name: str = "single rank") -> None:
    """Every rank's loss and gradient norm after each of ``steps`` steps (``losses``/``norms`` lists) equals the
    reference run's (``ref_name``) within the relative tolerances."""
    for rank, res in enumerate(per_rank):
        for s in range(steps):
            what = f"{name} rank {rank} step {s + 1}"
            assert rel_diff(res["losses"][s], ref["losses"][s]) < loss_rtol, \
                f"{what}: loss {res['losses'][s]} vs {ref_name} {ref['losses'][s]}"
            assert rel_diff(res["norms"][s], ref["norms"][s]) < norm_rtol, \
                f"{what}: grad norm {res['norms'][s]} vs {ref_name} {ref['norms'][s]}"

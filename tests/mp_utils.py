"""Helpers for tests that need process groups: one in-process rank, or N spawned gloo ranks.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes (torch.multiprocessing, spawn
start method) with the launcher environment a real run has (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free port), calls ``fn(rank, world_size,
*args)`` in each and returns the per-rank results in rank order. A rank's exception is re-raised
in the test with that rank's traceback; ranks still running at the timeout are killed. ``fn`` must
be a module-level function (spawn pickles it by name). Return plain Python values (floats, lists,
dicts): tensors would travel through shared memory owned by a rank that is about to exit.
"""

from __future__ import annotations

import contextlib
import os
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable, Iterator

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class RankFailed(RuntimeError):
    pass


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # the test machine is shared and small
    try:
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - report everything to the parent, including SystemExit
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0) -> list[Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    collected: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode is not None and i not in collected]
                if dead:  # died without reporting (e.g. killed by a signal): no point waiting
                    time.sleep(0.5)  # let a late report land
                    if results.empty():
                        break
                continue
            collected[rank] = (ok, value)
            if not ok:
                break  # the other ranks are likely stuck in a collective now
    finally:
        for p in procs:
            p.join(timeout=5 if len(collected) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    failures = {r: v for r, (ok, v) in collected.items() if not ok}
    if failures:
        raise RankFailed("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items())))
    if len(collected) < world_size:
        codes = {i: p.exitcode for i, p in enumerate(procs)}
        raise RankFailed(
            f"ranks {sorted(set(range(world_size)) - set(collected))} did not report within {timeout_s}s "
            f"(exit codes {codes})"
        )
    return [collected[r][1] for r in range(world_size)]

"""Run a function on N local ranks (spawned processes, one gloo process group) and collect their results.

The converters build megatron models and DeepSpeed engines in a given tensor/pipeline layout; that needs as
many ranks as the layout has. They run on the CPU (``CUDA_VISIBLE_DEVICES`` is cleared in the children,
DeepSpeed uses its CPU accelerator), so a conversion needs no GPUs and does not disturb a GPU job.

``fn(rank, world_size, *args)`` must be a module-level function. Results travel back pickled, so return plain
values or numpy arrays (not torch tensors, whose shared memory belongs to a process that is about to exit).
"""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable, Optional

from largelm.errors import ConversionError


class RankFailed(ConversionError):
    """A spawned rank raised (its traceback is in the message) or died."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, threads: int, args: tuple, results,
               log_path: Optional[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    if log_path:  # library chatter (DeepSpeed, megatron warnings) goes to a per-rank log, shown on failure
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    try:
        import warnings

        import torch

        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)

        torch.set_num_threads(threads)
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException as err:  # noqa: BLE001 - report everything, including SystemExit
        detail = str(err) if isinstance(err, ConversionError) else traceback.format_exc()
        results.put((rank, False, detail))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: Optional[float] = None,
              verbose: Optional[bool] = None) -> list[Any]:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, ...)]`` run in ``world_size`` fresh processes.

    The ranks' own output goes to temporary per-rank logs (``verbose``: to this process's terminal); the tail of
    a failed rank's log is part of the error.
    """
    import tempfile

    import torch.multiprocessing as mp

    if verbose is None:
        verbose = os.environ.get("LARGELM_CONVERT_VERBOSE") == "1"
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    log_dir = None if verbose else tempfile.mkdtemp(prefix="largelm-convert-ranks-")
    logs = [None if log_dir is None else os.path.join(log_dir, f"rank{r}.log") for r in range(world_size)]
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, threads, args, results, logs[r]),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    collected: dict[int, tuple[bool, Any]] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while len(collected) < world_size:
            if deadline is not None and time.monotonic() > deadline:
                break
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue_module.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode is not None and i not in collected]
                if dead:
                    time.sleep(0.5)  # a late report may still be in the pipe
                    if results.empty():
                        break
                continue
            collected[rank] = (ok, value)
            if not ok:
                break  # the others are probably blocked in a collective now
    finally:
        for p in procs:
            p.join(timeout=10 if len(collected) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    try:
        failures = {r: v for r, (ok, v) in collected.items() if not ok}
        if failures:
            raise RankFailed("\n".join(f"rank {r}: {msg}{_tail(logs[r]) if msg.startswith('Traceback') else ''}"
                                        for r, msg in sorted(failures.items())))
        if len(collected) < world_size:
            codes = {i: p.exitcode for i, p in enumerate(procs)}
            lost = sorted(set(range(world_size)) - set(collected))
            raise RankFailed(f"ranks {lost} did not finish (exit codes {codes}){_tail(logs[lost[0]])}")
        return [collected[r][1] for r in range(world_size)]
    finally:
        if log_dir is not None:
            import shutil

            shutil.rmtree(log_dir, ignore_errors=True)


def _tail(path: Optional[str], lines: int = 25) -> str:
    if not path or not os.path.isfile(path):
        return ""
    with open(path, errors="replace") as fh:
        text = fh.read().splitlines()[-lines:]
    return ("\n  --- last lines of its log ---\n  " + "\n  ".join(text)) if text else ""

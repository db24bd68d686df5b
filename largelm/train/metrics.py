"""Throughput, MFU and memory measurements for logging."""

from __future__ import annotations

import resource
import sys
import time
from typing import Iterable, Optional

import torch


def matmul_flops(linears: Iterable[tuple[int, int, int]], dtype: torch.dtype, seconds_per_product: float = 0.05,
                 device: Optional[torch.device] = None) -> dict[tuple[str, int, int, int], float]:
    """Achieved FLOP/s of the three products of each linear ``(m, k, n)`` (input ``[m, k]``, weight ``[n, k]``) in
    ``dtype`` on ``device`` (CUDA if present), with the operand layouts training uses - forward ``x @ w.T``, input
    gradient ``g @ w``, weight gradient ``g.T @ x`` - keyed ``(product, m, k, n)``. The layout matters: on an AVX2
    CPU bf16 ``[1024, 128] @ [4096, 128].T`` ran at 7.7 GFLOP/s and ``[1024, 4096] @ [4096, 128]`` at 0.8.
    The best of these rates is the MFU denominator when no datasheet peak is configured (``logging.
    peak_tflops_per_rank``): measured on the model's own products, not one square matmul, because a peak measured
    where the device is slow (square n=1024 in bf16 on AVX2: 0.8 GFLOP/s) gave MFU above 100% (364%, gpt-tiny).
    One warm-up product, then products until ``seconds_per_product`` has passed (a warm-up slower than that is
    the measurement: a slow device's start-up stays short)."""
    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    rates = {}
    # Operands from a private generator: the trainer measures after restoring a checkpoint's RNG state, which a draw
    # from the global generator would move (a resumed run with dropout would no longer be bit-exact).
    gen = torch.Generator().manual_seed(0)

    def operand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    for m, k, n in dict.fromkeys(linears):  # each distinct shape once
        x, w, g = operand(m, k), operand(n, k), operand(m, n)
        for name, a, b in (("forward", x, w.t()), ("input_grad", g, w), ("weight_grad", g.t(), x)):
            start = time.perf_counter()
            torch.matmul(a, b)  # warm up (oneDNN primitive creation, caches)
            _sync(device)
            iters, elapsed = 1, time.perf_counter() - start
            if elapsed < seconds_per_product:
                iters, start = 0, time.perf_counter()
                while iters == 0 or time.perf_counter() - start < seconds_per_product:
                    torch.matmul(a, b)
                    iters += 1
                    _sync(device)
                elapsed = time.perf_counter() - start
            rates[(name, m, k, n)] = 2 * m * k * n * iters / elapsed
    return rates


def products_seconds(rates: dict[tuple[str, int, int, int], float]) -> float:
    """Time to compute each product of ``matmul_flops`` once at its measured rate: comparing it between dtypes gives
    how much slower a step's matrix products are (the rates of one product say little: bf16 on AVX2 ranges 1-31
    GFLOP/s with the layout)."""
    return sum(2 * m * k * n / rate for (_, m, k, n), rate in rates.items())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_stats() -> dict[str, float]:
    """Peak memory in GiB: device allocator on GPU, process max RSS on CPU."""
    if torch.cuda.is_available():
        return {"mem/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform != "darwin" else 1 / 1024  # macOS reports bytes
    return {"mem/max_rss_gib": rss_kib * scale / 2**20}


class Throughput:
    """Tokens/s and MFU over the interval since the last ``report``."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops_total: float):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total
        self._t0 = time.perf_counter()
        self._steps = 0

    def step(self) -> None:
        self._steps += 1

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tokens_per_s = self._steps * self.tokens_per_step / elapsed
        out = {
            "perf/tokens_per_s": tokens_per_s,
            "perf/step_time_s": elapsed / max(self._steps, 1),
            "perf/mfu": tokens_per_s * self.flops_per_token / self.peak_flops_total if self.peak_flops_total else 0.0,
        }
        self._t0, self._steps = time.perf_counter(), 0
        return out

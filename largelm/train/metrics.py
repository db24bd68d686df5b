"""Throughput, MFU and memory measurements for logging."""

from __future__ import annotations

import resource
import sys
import time

import torch


def measure_matmul_peak_flops(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.5) -> float:
    """Achieved FLOP/s of a square matmul on this device: the MFU denominator when no peak is configured.

    On CPU there is no datasheet peak to trust (threads, turbo, AVX-512 availability vary), so we measure it.
    """
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.matmul(a, b)  # warm up
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        iters += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - start)


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

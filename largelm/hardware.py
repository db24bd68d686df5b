"""What the device computes natively, and the training precision that follows (``train.precision: auto``).

bf16 is fast only where the hardware multiplies it natively: CUDA GPUs of compute capability 8.0+ and CPUs with
AVX512_BF16 or AMX. On an AVX2-only CPU torch's bf16 matmul is 30-85x *slower* than fp32 (docs/design.md
"Precision and CPU capability"), so ``auto`` picks bf16 where it is native and fp32 elsewhere.

On CPU the answer needs two facts: the CPU's flags (cpuinfo, through ``torch.cpu``) and what oneDNN, which runs
torch's bf16 matmuls, is allowed to use: ``ONEDNN_MAX_CPU_ISA=AVX2`` on an AVX512_BF16 machine makes its bf16
path as slow as an AVX2 machine's, and ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` follows that setting.

Resuming is the other input: a checkpoint trained in one precision is continued in it by ``auto`` (a change of
numerics at resume is a decision the user makes with an explicit ``train.precision``), with a warning when that
precision is slow on this device. Bottom layer: imports only torch and the config.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

from largelm.config import Config

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class DeviceInfo:
    """The facts ``choose_precision`` decides on. Tests build fakes of it for capabilities the machine lacks."""

    type: str  # "cpu" or "cuda"
    name: str  # CPU model or GPU name
    capability: str  # ATen's CPU capability ("AVX2", "AVX512", "DEFAULT") or "sm_XY"
    native_bf16: bool
    detail: str  # why native_bf16 is what it is, for the log line

    def describe(self) -> str:
        return f"{self.type} {self.name} ({self.capability}; {self.detail})"


@functools.lru_cache(maxsize=None)  # a process's device does not change; ``auto`` is resolved in many places
def detect_device() -> DeviceInfo:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        native = major >= 8  # Ampere+: bf16 tensor cores; is_bf16_supported() also admits emulated bf16
        return DeviceInfo("cuda", torch.cuda.get_device_name(), f"sm_{major}{minor}", native,
                          "bf16 tensor cores" if native else "no bf16 tensor cores (compute capability < 8.0)")
    return _cpu_info()


def _cpu_info() -> DeviceInfo:
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    capability = torch.backends.cpu.get_cpu_capability()
    name = str(caps.get("cpu_name") or "CPU")
    flags = [f for f in ("avx512_bf16", "amx_bf16") if caps.get(f)]
    if not flags:
        return DeviceInfo("cpu", name, capability, False, "no AVX512_BF16 or AMX: bf16 matmuls are emulated")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        limit = os.environ.get("ONEDNN_MAX_CPU_ISA", "a oneDNN ISA limit")
        return DeviceInfo("cpu", name, capability, False,
                          f"{'/'.join(f.upper() for f in flags)} present but oneDNN is limited by {limit}")
    return DeviceInfo("cpu", name, capability, True, f"{'/'.join(f.upper() for f in flags)}")


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "fp32" or "bf16": what the run computes in
    reason: str  # one line for the log: what was asked, on which device, and why this
    slow_bf16: bool  # bf16 on a device without native bf16: warn, with the measured slow-down


def choose_precision(requested: str, device: DeviceInfo, checkpoint_precision: Optional[str] = None
                     ) -> PrecisionChoice:
    """The run's precision for ``train.precision=requested`` on ``device``, resuming a checkpoint trained in
    ``checkpoint_precision`` (None: a fresh run)."""
    if requested not in ("auto", *PRECISIONS):
        raise ValueError(f"train.precision must be auto, fp32 or bf16, not {requested!r}")
    where = device.describe()
    if requested != "auto":
        precision = requested
        reason = f"train.precision={requested} (explicit) on {where}"
        if checkpoint_precision and checkpoint_precision != requested:
            reason += (f"; the checkpoint was trained in {checkpoint_precision}: numerics change from "
                       f"{checkpoint_precision} to {requested} at this resume")
    elif checkpoint_precision in PRECISIONS:
        precision = checkpoint_precision
        native = "bf16" if device.native_bf16 else "fp32"
        reason = f"train.precision=auto resumes a {precision} checkpoint in {precision} on {where}"
        if native != precision:
            reason += (f" (a fresh run here would use {native}; set train.precision={native} to switch, which "
                       f"changes the numerics)")
    else:
        precision = "bf16" if device.native_bf16 else "fp32"
        reason = f"train.precision=auto chose {precision} on {where}"
    return PrecisionChoice(precision, reason, slow_bf16=precision == "bf16" and not device.native_bf16)


def run_precision(cfg: Config) -> str:
    """The concrete precision of ``cfg``: as configured, or (``auto``, a config that preflight has not resolved,
    e.g. built in a test or a tool) what ``auto`` picks for a fresh run on this device."""
    requested = cfg.train.precision
    return requested if requested != "auto" else choose_precision("auto", detect_device()).precision


def is_bf16(cfg: Config) -> bool:
    return run_precision(cfg) == "bf16"


def model_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if is_bf16(cfg) else torch.float32


def main() -> None:
    """``python -m largelm.hardware``: this device, and what ``train.precision: auto`` picks on it for a fresh run."""
    device = detect_device()
    print(f"device: {device.describe()}")
    print(f"train.precision=auto -> {choose_precision('auto', device).precision}")


if __name__ == "__main__":
    main()

"""Fault injection for the fault-tolerance tests (``tests/faults``). TEST HOOKS ONLY: inert unless the
environment variable ``LARGELM_FAULTS`` is set, and never set by any config or launcher.

``LARGELM_FAULTS`` is a comma-separated list of ``KIND@STEP`` with an optional ``:rank=R`` (default: every rank,
except the ``*_in_save`` kinds, which default to rank 0)::

    LARGELM_FAULTS="nan_loss@3:rank=1,nan_grad@5,nan_weight@7,kill_in_save@4"

    nan_loss@S        step S's first micro-batch produces a NaN loss (the model's per-token loss output is
                      multiplied by NaN, so its gradients are NaN too): a forward-pass overflow
    nan_grad@S        step S's first micro-batch has a finite loss but NaN gradients: a backward-pass overflow
    loss_spike@S      step S's first micro-batch loss is multiplied by 50 (finite): a loss spike
    nan_weight@S      before step S one weight of the model is set to NaN: corrupted parameters, every later
                      step is non-finite (the run must abort after ``train.max_bad_steps``)
    kill_in_save@S    the rank SIGKILLs itself while saving the checkpoint of step S, after DeepSpeed has
                      written its files and before the manifest/rename (a node dying mid-save)
    stop_in_save@S    the rank SIGSTOPs itself at the same point (a node frozen mid-save: its peers wait in the save's
                      collectives, bounded by ``checkpoint.save_timeout_s``)
    enospc_in_save@S  the save of step S fails with ENOSPC at the same point (disk full; the tests prefer a
                      real full tmpfs and use this only where mounting one is not possible)

Steps are 1-based optimizer steps (the step number printed in ``step N/M`` lines). An unknown kind or a
malformed entry is an error, so a typo cannot silently disable a test's fault.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from typing import Optional

import torch

ENV = "LARGELM_FAULTS"
KINDS = ("nan_loss", "nan_grad", "loss_spike", "nan_weight", "kill_in_save", "stop_in_save", "enospc_in_save")
_RANK0_DEFAULT = ("kill_in_save", "stop_in_save", "enospc_in_save")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: Optional[int]  # None: every rank


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        head, _, opts = item.partition(":")
        kind, at, step = head.partition("@")
        if kind not in KINDS or not at or not step.isdigit():
            raise ValueError(f"{ENV}: bad entry {item!r}; expected KIND@STEP[:rank=R] with KIND in {KINDS}")
        rank: Optional[int] = 0 if kind in _RANK0_DEFAULT else None
        if opts:
            key, _, value = opts.partition("=")
            if key != "rank" or not value.isdigit():
                raise ValueError(f"{ENV}: bad option {opts!r} in {item!r}; only rank=R is supported")
            rank = int(value)
        faults.append(Fault(kind, int(step), rank))
    return faults


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def active(kind: str, step: int, rank: Optional[int] = None) -> bool:
    """Is fault ``kind`` scheduled for ``step`` on this rank?"""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    rank = _rank() if rank is None else rank
    return any(f.kind == kind and f.step == step and f.rank in (None, rank) for f in parse(spec))


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def in_save(step: int) -> None:
    """Called by the checkpoint manager between DeepSpeed's writes and the manifest."""
    if active("kill_in_save", step):
        print(f"[fault injection] rank {_rank()}: SIGKILL during the save of step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if active("stop_in_save", step):
        print(f"[fault injection] rank {_rank()}: SIGSTOP during the save of step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    if active("enospc_in_save", step):
        raise OSError(errno.ENOSPC, f"[fault injection] {os.strerror(errno.ENOSPC)}")


class ModelFaults:
    """Forward hook on the model (training only) that injects the NaN faults scheduled for the current step."""

    def __init__(self, model):
        self.model = model
        self.step = 0  # 1-based step about to run; set by the trainer
        self._fired: set[tuple[str, int]] = set()
        self.handle = model.register_forward_hook(self._hook) if enabled() else None

    def before_step(self, step: int) -> None:
        self.step = step
        if active("nan_weight", step) and ("nan_weight", step) not in self._fired:
            self._fired.add(("nan_weight", step))
            with torch.no_grad():
                # A 1-D parameter (a norm weight or a bias) touches every token, so every later loss is NaN.
                param = next(p for p in self.model.parameters() if p.requires_grad and p.dim() == 1)
                param.view(-1)[0] = float("nan")
            print(f"[fault injection] rank {_rank()}: set a weight to NaN before step {step}", flush=True)

    def _hook(self, module, args, output):
        if not module.training:
            return output
        for kind in ("nan_loss", "nan_grad", "loss_spike"):
            if active(kind, self.step) and (kind, self.step) not in self._fired:
                self._fired.add((kind, self.step))
                print(f"[fault injection] rank {_rank()}: {kind} at step {self.step}", flush=True)
                if kind == "nan_loss":
                    return output * float("nan")
                if kind == "loss_spike":
                    return output * 50.0
                return NanGrad.apply(output)
        return output


class NanGrad(torch.autograd.Function):
    """Identity forward; the gradient flowing back is replaced by NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))

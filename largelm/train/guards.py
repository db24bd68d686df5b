"""Numerical fault handling: a step with a non-finite loss or gradient is skipped, counted and logged; too many in
a row abort the run.

How a step is skipped (nothing is special-cased per rank; every decision is the same on all ranks):

* DeepSpeed's ZeRO optimizers (stages 1-3, fp32 and bf16; bf16 needs ``bf16.check_grad_overflow``, DeepSpeed's
  default) compute the global gradient norm at the accumulation boundary, all-reduced over the data- and
  model-parallel groups. A NaN/inf norm sets ``optimizer.overflow``: the update is not applied, gradients are
  zeroed, ``engine.skipped_steps`` is incremented and the LR scheduler is *not* stepped.
* A non-finite loss gives non-finite gradients (the loss is the root of the backward graph), so a NaN loss on
  any rank is caught the same way: the reduce-scatter carries it to every rank's norm.
* Optimizers without that check (ZeRO-0 fp32: DeepSpeed hands the plain torch optimizer through, e.g. under the
  pipeline engine) get the same semantics from the ``overflow_guard`` patch
  (``largelm.parallel.deepspeed_compat.install_overflow_guard``, installed with every engine).

``StepGuard.check`` then classifies the step from the all-reduced loss and ``engine.was_step_applied()``.

What "skipped" means for the rest of the run (Megatron's semantics): the step number advances and the step's
micro-batches are consumed (a poisoned batch is not retried), the parameters, optimizer moments and the LR
schedule stay where they were. Skips are counted in ``train/skipped_steps`` (tensorboard) and in checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class Verdict:
    ok: bool
    message: str = ""
    abort: bool = False
    spike: bool = False


class StepGuard:
    """Per-run bookkeeping of bad steps (identical on every rank; saved in the trainer state)."""

    def __init__(self, max_bad_steps: int, loss_spike_factor: Optional[float] = None, spike_warmup: int = 3,
                 ema_decay: float = 0.9):
        self.max_bad_steps = max_bad_steps
        self.loss_spike_factor = loss_spike_factor
        self.spike_warmup = spike_warmup
        self.ema_decay = ema_decay
        self.skipped = 0  # steps skipped in this run so far
        self.consecutive = 0  # current streak of skipped steps
        self.spikes = 0
        self._ema: Optional[float] = None
        self._good = 0  # finite steps seen (for the spike detector's warm-up)

    def check(self, step: int, loss: float, applied: bool, grad_norm: Optional[float] = None) -> Verdict:
        finite = math.isfinite(loss)
        if finite and applied:
            self.consecutive = 0
            return self._spike(step, loss)
        self.skipped += 1
        self.consecutive += 1
        if not finite:
            what = f"non-finite loss {loss}"
        else:
            what = f"non-finite gradients (loss {loss:.4f}, grad norm {grad_norm})"
        if applied:  # cannot happen with the overflow checks above; say so loudly if it ever does
            what += " - WARNING: the optimizer applied this update"
        message = (f"step {step}: skipped: {what} on some rank; update not applied "
                   f"({self.consecutive} in a row, {self.skipped} skipped in total)")
        abort = self.consecutive >= self.max_bad_steps
        return Verdict(False, message, abort=abort)

    def abort_message(self, step: int, last_checkpoint: Optional[str]) -> str:
        where = f"last checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        return (f"aborting at step {step}: {self.consecutive} consecutive steps with non-finite loss or gradients "
                f"(train.max_bad_steps={self.max_bad_steps}); the parameters or the data around these steps are "
                f"bad ({where}; resume from it with a lower optimizer.lr, or check the data)")

    def _spike(self, step: int, loss: float) -> Verdict:
        verdict = Verdict(True)
        factor = self.loss_spike_factor
        if factor and self._ema is not None and self._good >= self.spike_warmup and loss > factor * self._ema:
            self.spikes += 1
            verdict = Verdict(True, f"step {step}: loss spike: {loss:.4f} is more than {factor:g}x the running "
                                    f"mean {self._ema:.4f} ({self.spikes} spikes so far)", spike=True)
        else:  # spikes do not drag the running mean up
            self._ema = loss if self._ema is None else self.ema_decay * self._ema + (1 - self.ema_decay) * loss
            self._good += 1
        return verdict

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "spikes": self.spikes,
                "ema": self._ema, "good": self._good}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.spikes = int(state.get("spikes", 0))
        self._ema = state.get("ema")
        self._good = int(state.get("good", 0))

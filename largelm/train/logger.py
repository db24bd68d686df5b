"""Rank-0 run logging: a progress bar (loss, tokens/s, ETA), periodic text lines, tensorboard scalars and their
W&B mirror (largelm/train/wandb_log.py)."""

from __future__ import annotations

import sys
from typing import Optional

from tqdm import tqdm

from largelm.train.wandb_log import WandbMirror


class RunLogger:
    def __init__(self, enabled: bool, total_steps: int, start_step: int, tensorboard_dir: Optional[str],
                 progress_bar: bool = True, wandb: Optional[WandbMirror] = None):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.wandb = wandb if enabled else None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0,
                            disable=None)  # None: only on a terminal; log files get the step lines instead

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(step, values)

    def step(self, loss: float, tokens_per_s: Optional[float]) -> None:
        if self.bar is not None:
            postfix = {"loss": f"{loss:.4f}"}
            if tokens_per_s is not None:
                postfix["tok/s"] = f"{tokens_per_s:,.0f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def line(self, text: str) -> None:
        """A durable log line (the progress bar is for humans; lines are for log files and tests)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)
        sys.stdout.flush()

    def close(self, failed: bool = False) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close(failed)

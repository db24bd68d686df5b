"""Weights & Biases mirror of the run's tensorboard scalars (``logging.wandb``; rank 0 only).

Same tags, same values, same steps as tensorboard. The training step is logged as the metric ``train/step`` and
declared the x-axis of every metric (``define_metric("*", step_metric="train/step")``); W&B's own ``_step`` is
left to count log calls. Why: W&B drops a ``step=`` lower than one it has already seen, and a resumed run logs
steps again whenever it resumes a checkpoint older than the last logged step (a kill between a log and the next
save, a rollback to an older checkpoint). With the custom x-axis those rows are kept and plotted at their
training step, next to the abandoned timeline's, as tensorboard keeps both events.

The W&B run id is kept in ``<checkpoint.dir>/wandb_run_id``: a run that resumes a checkpoint passes it with
``resume="allow"`` and continues the same W&B run (offline: a new ``offline-run-*`` directory with the same id,
which ``wandb sync`` uploads in order into that run); a run that starts fresh (nothing resumed) starts a new W&B
run and stores its id.

W&B never stops or hangs training: a failure to start online is a warning and the run is recorded offline
instead (``wandb sync`` later); any later failure is a warning and W&B is off for the rest of the run
(tensorboard goes on). Start-up and the final upload are bounded by W&B's ``init_timeout``/``finish_timeout``
(``logging.wandb.init_timeout_s``/``finish_timeout_s``); what is not uploaded by then stays on disk.
"""

from __future__ import annotations

import os
import re
import secrets
import string
from pathlib import Path
from typing import Optional

from largelm.config import Config
from largelm.fileio import write_text_atomic

RUN_ID_FILE = "wandb_run_id"
STEP_METRIC = "train/step"
_RUN_ID = re.compile(r"[a-z0-9_-]{1,64}", re.IGNORECASE)


def warn(text: str) -> None:
    print(f"warning: W&B: {text}", flush=True)


def run_id(checkpoint_dir: str | Path, resumed: bool) -> str:
    """This training run's W&B id: the stored one when the run resumed a checkpoint (and one is stored), else a
    new one (8 characters, as W&B's own), stored atomically for the runs that will resume this one."""
    path = Path(checkpoint_dir) / RUN_ID_FILE
    if resumed and path.is_file():
        stored = path.read_text().strip()
        if _RUN_ID.fullmatch(stored):
            return stored
        warn(f"{path} does not hold a W&B run id ({stored[:40]!r}): starting a new W&B run")
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, new + "\n")
    return new


class WandbMirror:
    """One W&B run for this training run (rank 0). ``run`` is None when W&B is disabled or has failed."""

    def __init__(self, cfg: Config, resumed: bool):
        self.run = None
        self.id: Optional[str] = None
        w = cfg.logging.wandb
        if w is None or w.mode == "disabled":
            return
        import wandb  # lazy (optional dependency: imported only when logging.wandb is set and not disabled)

        self.id = run_id(cfg.checkpoint.dir, resumed)
        # Own W&B service: wandb.init in a parent process (a notebook, a test session, a driver script) exports
        # WANDB_SERVICE, and every job started from it would log through the parent's wandb-core. There a run killed
        # with SIGKILL leaves its stream registered, and its resume is refused ("run ID ... is in use").
        os.environ.pop("WANDB_SERVICE", None)
        if w.dir:
            Path(w.dir).mkdir(parents=True, exist_ok=True)
        # console off: rank 0's stdout stays the launcher's plain pipe (its step lines are parsed and logged)
        settings = wandb.Settings(init_timeout=w.init_timeout_s, finish_timeout=w.finish_timeout_s, console="off")
        for mode in ("online", "offline") if w.mode == "online" else (w.mode,):
            try:
                self.run = wandb.init(project=w.project, entity=w.entity, name=w.name or cfg.name, dir=w.dir,
                                      id=self.id, resume="allow", mode=mode, config=cfg.model_dump(mode="json"),
                                      settings=settings, reinit="create_new")
                break
            except Exception as err:  # noqa: BLE001 - any failure to start W&B is a warning, never fatal
                then = "recording the run offline instead" if mode == "online" else "training goes on without it"
                warn(f"could not start the {mode} run {self.id} ({type(err).__name__}: {err}); {then}")
        if self.run is None:
            return
        try:
            self.run.define_metric(STEP_METRIC)
            self.run.define_metric("*", step_metric=STEP_METRIC)
        except Exception as err:  # noqa: BLE001
            self._failed("declaring the train/step x-axis", err)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.run is None:
            return
        try:
            self.run.log({**values, STEP_METRIC: step})
        except Exception as err:  # noqa: BLE001
            self._failed(f"logging step {step}", err)

    def _failed(self, doing: str, err: Exception) -> None:
        warn(f"{doing} failed ({type(err).__name__}: {err}); W&B is off for the rest of this run "
             f"(tensorboard goes on)")
        self.run = None

    def close(self, failed: bool = False) -> None:
        """Finish the run (marked failed when training failed), waiting at most ``finish_timeout_s``."""
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=1 if failed else 0)
        except Exception as err:  # noqa: BLE001
            warn(f"finishing run {self.id} failed ({type(err).__name__}: {err})")

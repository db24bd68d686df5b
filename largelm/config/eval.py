"""The ``eval:`` section: lm-evaluation-harness during training, and the names of the bundled task set."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# The task set ``largelm-eval --make-tasks`` writes (largelm/prepare/eval_tasks.py), and the tag naming all of them.
BUNDLED_EVAL_TASKS = ("largelm_next_line", "largelm_last_word", "largelm_perplexity", "largelm_next_line_gen")
EVAL_TASK_TAG = "largelm_heldout"


class _TaskYamlLoader(yaml.SafeLoader):
    """Safe loading that reads lm-eval's own tags (``!function module.name``) as nothing: only names are wanted."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def task_names_in(task_dir: str | Path) -> set[str]:
    """The task, tag and group names that the lm-eval YAMLs under ``task_dir`` define (unreadable files: none)."""
    root = Path(task_dir)
    if not root.is_dir():
        return set()
    names: set[str] = set()
    for path in sorted(root.rglob("*.yaml")):
        try:
            doc = yaml.load(path.read_text(errors="replace"), Loader=_TaskYamlLoader)  # noqa: S506 - safe loader
        except yaml.YAMLError:
            continue
        if not isinstance(doc, dict):
            continue
        for key in ("task", "tag", "group"):
            value = doc.get(key)
            values = value if isinstance(value, list) else [value]
            names.update(v for v in values if isinstance(v, str))
    return names


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    """Downstream evaluation with lm-evaluation-harness during training (largelm/train/harness_eval.py): every
    ``interval`` steps rank 0 runs ``tasks`` (on its own model, or with every forward a collective over all ranks
    for TP/PP/ZeRO-3 layouts) and logs ``eval/<task>/<metric>``."""

    tasks: list[str] = Field(min_length=1)
    interval: int = Field(gt=0, description="steps between evaluations")
    limit: Optional[int] = Field(default=None, gt=0, description="documents per task (None: all)")
    task_dir: str = Field(description="lm-eval task YAMLs, e.g. written by `largelm-eval --make-tasks`")
    batch_size: int = Field(default=8, gt=0)
    # The watchdog allows an evaluation this long; with rank 0 evaluating alone, the other ranks wait this long for
    # it (a monitored barrier). Collective evaluations wait between forwards within parallel.timeout_s.
    timeout_s: float = Field(default=1800.0, gt=0)

    @model_validator(mode="after")
    def _check_tasks(self) -> "EvalConfig":
        known = set(BUNDLED_EVAL_TASKS) | {EVAL_TASK_TAG} | task_names_in(self.task_dir)
        unknown = [t for t in self.tasks if t not in known]
        if unknown:
            raise ValueError(f"eval.tasks: unknown task {unknown[0]!r} (known: {', '.join(sorted(known))}; "
                             f"other tasks must be defined by a YAML under eval.task_dir={self.task_dir!r})")
        return self

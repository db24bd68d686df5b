"""Is a resume a layout change? A checkpoint's parallel layout (TP/PP/DP size, ZeRO stage) compared with the run's,
and the text naming the change. Apart from the resharding itself (largelm/checkpoint/elastic.py), which builds
models: the launcher's preflight asks this question and must not import megatron (start-up time of every launch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from largelm.config import Config
from largelm.hardware import is_bf16
from largelm.parallel.deepspeed_config import engine_zero_stage

RESHARD_SETTING = "checkpoint.reshard_on_resume=true"


@dataclass(frozen=True)
class Layout:
    """How a run is laid out over its ranks (what a checkpoint's files depend on), not what it computes."""

    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    zero_stage: int  # configured
    engine_zero_stage: int  # what DeepSpeed ran (engine_zero_stage: single-replica runs may run a cheaper one)
    expert_parallel: int  # MoE: which experts each rank's files hold
    # not part of the layout: the same engine resumes either precision's state (fp32 masters and moments); shown
    precision: str = field(compare=False)

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> "Layout":
        p = cfg.parallel
        return cls(p.tensor_parallel, p.pipeline_parallel, cfg.data_parallel_size(world_size), p.zero_stage,
                   engine_zero_stage(cfg, world_size), p.expert_parallel, "bf16" if is_bf16(cfg) else "fp32")

    def describe(self) -> str:
        engine = "" if self.engine_zero_stage == self.zero_stage else f" (engine runs ZeRO-{self.engine_zero_stage})"
        experts = f" EP={self.expert_parallel}" if self.expert_parallel > 1 else ""
        return (f"TP={self.tensor_parallel} PP={self.pipeline_parallel} DP={self.data_parallel}{experts} "
                f"ZeRO-{self.zero_stage}{engine} {self.precision}")


def layout_change(saved: Config, saved_world: int, cfg: Config, world_size: int) -> Optional[str]:
    """None when ``cfg`` on ``world_size`` ranks lays the run out as the checkpoint was, else what changes
    (the text the trainer prints when it reshards and preflight's refusal when it may not)."""
    old, new = Layout.of(saved, saved_world), Layout.of(cfg, world_size)
    if old == new:
        return None
    lines = [f"parallel layout changes: {old.describe()} -> {new.describe()} ({saved_world} -> {world_size} ranks)",
             "optimizer carried: fp32 master weights, Adam exp_avg/exp_avg_sq and step count, LR schedule at the "
             "same step (resharded from the checkpoint's full state)"]
    was, now = saved.tokens_per_step(saved_world), cfg.tokens_per_step(world_size)
    if was != now:
        lines.append(f"tokens per optimizer step: {was} -> {now} (micro_batch x grad_accum x DP x seq_length)")
    return "\n  ".join(lines)

"""Every change largelm makes to DeepSpeed 0.19.8's behaviour, in one place (as ``cpu_compat`` is for megatron-core).

``PATCHES`` lists each one: the DeepSpeed attribute replaced or wrapped, what DeepSpeed does there, why largelm
changes it, the runs it applies to and the test that pins it. ``python -m largelm.parallel`` prints the table
(with the megatron-core ones); docs/design.md "Library adaptations" explains them.

* Engine patches (``scope="engine"``): ``install_deepspeed_compat(engine, cfg, world_size)`` - called once by
  ``largelm.train.engine.initialize_engine`` right after ``deepspeed.initialize`` - applies every one whose
  condition holds for this run, on that engine's instances only (nothing global), and returns their names; rank 0
  prints one line naming them. The optimizer patches look at the optimizer DeepSpeed actually built (its class,
  clipping); the others at the ZeRO stage DeepSpeed runs (``deepspeed_config.engine_zero_stage``).
* Checkpoint loading (``scope="checkpoint"``): ``forced_weights_only()`` around ``engine.load_checkpoint``, and
  ``safe_torch_load`` for every checkpoint file largelm reads itself (module ``checkpoint``).
* Process (``scope="process"``): ``ops.prepare_cpu_comm_op()`` builds and loads DeepSpeed's CPU comm op before
  ``init_distributed`` (per-configuration build directory, no wait on a dead build's lock).
* Launcher (``scope="launcher"``): ``local_launch_in_process()``, ``fast_launch_poll()`` and
  ``continue_stopped_ranks()`` (module ``launcher``, used by ``largelm/ds_launcher.py``; not imported here, so a
  training rank does not load DeepSpeed's runner).

``install_deepspeed_compat`` and the launcher contexts first call ``check_deepspeed_version()``: the patches replace
private DeepSpeed internals, so another DeepSpeed version is refused with a RuntimeError naming both versions rather
than patched blindly (a run always builds its engine, and so checks, before it saves or loads a checkpoint).
"""

from __future__ import annotations

import torch.distributed as dist

from largelm.config import Config
from largelm.hardware import is_bf16
from largelm.parallel.deepspeed_compat.checkpoint import (
    SAFE_GLOBALS,
    SafeTorchCheckpointEngine,
    UnsafeCheckpointError,
    forced_weights_only,
    install_safe_checkpoint_engine,
    safe_torch_load,
    take_write_error,
)
from largelm.parallel.deepspeed_compat.engine_step import (
    install_overflow_guard,
    report_zero0_grad_norm,
    skip_data_parallel_allreduce,
)
from largelm.parallel.deepspeed_compat.optimizer import (
    accumulate_bf16_gradients_in_place,
    clip_inside_fused_adamw,
    use_fused_adamw,
)
from largelm.parallel.deepspeed_compat.version import DEEPSPEED_VERSION, check_deepspeed_version
from largelm.parallel.deepspeed_config import engine_zero_stage, skips_data_parallel_reduction
from largelm.parallel.patches import Patch

__all__ = [
    "DEEPSPEED_VERSION", "PATCHES", "SAFE_GLOBALS", "SafeTorchCheckpointEngine", "UnsafeCheckpointError",
    "accumulate_bf16_gradients_in_place", "check_deepspeed_version", "clip_inside_fused_adamw",
    "forced_weights_only", "install_deepspeed_compat", "install_overflow_guard", "install_safe_checkpoint_engine",
    "report_zero0_grad_norm", "safe_torch_load", "skip_data_parallel_allreduce", "take_write_error", "use_fused_adamw",
]

_DS = f"DeepSpeed {DEEPSPEED_VERSION}"
_PERF = "tests/test_perf_hooks.py"

PATCHES = (
    Patch(
        name="fused_adamw", library=_DS, scope="engine",
        target="param_groups['fused'] of the torch.optim.AdamW inside engine.optimizer (ZeRO / BF16_Optimizer wrap it)",
        replaces="DeepSpeed's torch_adam builds AdamW(foreach=...) and cannot ask for fused=True",
        why="the foreach AdamW makes ~10 passes with full-size temporaries over ZeRO's flat fp32 partitions; the fused "
            "kernel updates in place in one pass (11x on a 27M-element partition), the same AdamW math",
        when="every run whose inner optimizer is torch AdamW/Adam on fused-supported devices and dtypes",
        test=f"{_PERF}::test_use_fused_adamw_switches_the_torch_optimizer_inside_a_wrapper",
    ),
    Patch(
        name="bf16_grad_in_place", library=_DS, scope="engine",
        target="BF16_Optimizer._update_hp_grad, .clear_hp_grads (replaced); .get_grads_for_reduction, .step (wrapped)",
        replaces="zeroes the fp32 gradient buffers twice per step and casts each bf16 gradient into an fp32 temporary",
        why="three extra passes over the fp32 gradients per step (~12 ms of a ~280 ms gpt-25m bf16 step); the first "
            "gradient is cast straight into the buffer, later ones added in place: the same fp32 numbers",
        when="bf16 with ZeRO-0/1 (DeepSpeed's BF16_Optimizer), any DP/PP, without MoE/AutoEP",
        test=f"{_PERF}::test_bf16_gradients_accumulate_in_place_with_the_same_result",
    ),
    Patch(
        name="fused_clip", library=_DS, scope="engine",
        target="BF16_Optimizer.step (wrapped: clip_grad is 0 inside it) + a step pre-hook on its torch AdamW "
               "setting grad_scale",
        replaces="clips by multiplying every fp32 gradient by max_norm / (norm + 1e-6) in a pass of its own",
        why="one more pass over the gradients right before AdamW reads them; fused AdamW divides by grad_scale "
            "inside its own pass instead (1% of a gpt-25m bf16 step)",
        when="BF16_Optimizer (bf16, ZeRO-0/1) with gradient clipping (optimizer.grad_clip > 0) and fused_adamw",
        test=f"{_PERF}::test_bf16_clipping_inside_fused_adamw_clips_as_deepspeed_does",
    ),
    Patch(
        name="zero0_grad_norm", library=_DS, scope="engine",
        target="engine.clip_fp32_gradients (with clipping) or a step pre-hook on the torch optimizer (without)",
        replaces="fp32 ZeRO-0 clips with clip_grad_norm_ and discards the norm; without clipping computes none",
        why="engine.get_global_grad_norm() would be None: grad_norm logged as nan, the bad-step guard blind to it",
        when="fp32 with the engine running ZeRO-0 (ZeRO-0 configured, or one data-parallel replica, no PP)",
        test=f"{_PERF}::test_one_replica_fp32_without_clipping_still_reports_the_grad_norm",
    ),
    Patch(
        name="skip_dp_allreduce", library=_DS, scope="engine",
        target="engine.enable_backward_allreduce (and engine.pipeline_enable_backward_allreduce) set to False",
        replaces="flattens every gradient into a bucket and all-reduces it over the data-parallel group",
        why="over a data-parallel group of one the all-reduce is an identity that still costs copies (7-15% of a step)",
        when="one data-parallel replica and the engine runs ZeRO-0, or ZeRO-1 with bf16 "
             "(deepspeed_config.skips_data_parallel_reduction)",
        test=f"{_PERF}::test_one_replica_fast_engine_trains_like_the_configured_stage",
    ),
    Patch(
        name="overflow_guard", library=_DS, scope="engine",
        target="engine.optimizer.step (wrapped) and engine.optimizer.overflow (added)",
        replaces="the plain torch optimizer DeepSpeed hands through for fp32 ZeRO-0 has no overflow check",
        why="a NaN/inf gradient would be applied; with the guard the step is skipped on every rank (all-reduced "
            "flag), the LR held and engine.skipped_steps counted, as DeepSpeed's own optimizers do",
        when="fp32 with the engine running ZeRO-0 (any optimizer without DeepSpeed's overflow attribute)",
        test="tests/faults/test_fault_numerics.py::test_every_optimizer_skips_nan_steps",
    ),
    Patch(
        name="moe_expert_groups", library=_DS, scope="engine build",
        target="deepspeed.utils.groups expert group registry (megatron's groups as ep_size_<EP>), expert params' "
               "allreduce/group_name, DeepSpeedEngine._configure_optimizer (has_moe_layers while it runs)",
        replaces="DeepSpeed's MoE path, taken only for its own deepspeed.moe.layer.MoE modules and its own groups",
        why="megatron's MoE experts differ across expert-parallel ranks: their gradients must be averaged and their "
            "ZeRO partitions kept over megatron's expert-data-parallel group, not the data-parallel group",
        when="model.arch='moe' with parallel.expert_parallel > 1 (largelm.train.engine.initialize_engine)",
        test="tests/test_moe.py::test_expert_parallel_2_equals_1",
    ),
    Patch(
        name="safe_checkpoint_engine", library=_DS, scope="engine",
        target="engine.checkpoint_engine.__class__: TorchCheckpointEngine -> SafeTorchCheckpointEngine",
        replaces="torch.load(weights_only=False) of every checkpoint file; a write error raised mid-save",
        why="unpickling a crafted checkpoint runs code; a rank raising inside save_checkpoint leaves the others "
            "waiting in DeepSpeed's barrier (the error is kept for take_write_error instead)",
        when="every run with DeepSpeed's default torch checkpoint engine (the checkpoint manager re-checks it "
             "before each save and load)",
        test="tests/faults/test_fault_security.py::test_crafted_checkpoint_files_are_refused",
    ),
    Patch(
        name="forced_weights_only", library=_DS, scope="checkpoint",
        target="torch.load inside engine.load_checkpoint (TORCH_FORCE_WEIGHTS_ONLY_LOAD + SAFE_GLOBALS)",
        replaces="DeepSpeed's universal-checkpoint paths call torch.load(weights_only=False) directly",
        why="those loads bypass the checkpoint engine; forced, they are weights-only with the same allowlist",
        when="every checkpoint load (CheckpointManager.load)",
        test="tests/faults/test_fault_security.py::test_crafted_checkpoint_files_are_refused",
    ),
    Patch(
        name="cpu_comm_op_build", library=_DS, scope="process",
        target="TORCH_EXTENSIONS_DIR (keyed per build configuration) and ShareMemCommBuilder.load before "
               "deepspeed.init_distributed, under a lock of ours",
        replaces="init_distributed JIT-builds the op in one directory per Python version behind torch's file baton",
        why="a build killed mid-way left the baton and every later launch waited forever without a word; two "
            "configurations rebuilt the op in turn (35-78 s each)",
        when="every CPU run (groups.init_distributed)",
        test="tests/faults/test_fault_launch.py::test_stale_build_lock_is_cleared_with_a_warning",
    ),
    Patch(
        name="local_launch_in_process", library=_DS, scope="launcher",
        target="deepspeed.launcher.runner.subprocess (a Spawner)",
        replaces="the runner starts `python -u -m deepspeed.launcher.launch` for this node as a second process",
        why="a second Python process importing DeepSpeed and tearing down: 3-7 s of every launch; the launch runs "
            "in the runner's process instead (multi-node commands are started as DeepSpeed starts them)",
        when="python -m largelm.ds_launcher (the deepspeed launcher of largelm-launch)",
        test="tests/test_launch.py::test_ds_launcher_runs_the_local_launch_in_process",
    ),
    Patch(
        name="fast_launch_poll", library=_DS, scope="launcher",
        target="deepspeed.launcher.launch.time (sleep capped at 0.1 s)",
        replaces="polls its ranks with time.sleep(1), once more after the last rank exited",
        why="up to a second at every run's end, and before a failing rank's exit code is acted on",
        when="python -m largelm.ds_launcher, launches on this node",
        test="tests/test_launch.py::test_ds_launcher_end_to_end_exit_code",
    ),
    Patch(
        name="continue_stopped_ranks", library=_DS, scope="launcher",
        target="deepspeed.launcher.launch.terminate_process_tree (SIGCONT to the tree first)",
        replaces="ends the ranks with SIGTERM, waits 30 s, then SIGKILL",
        why="a stopped (frozen) rank cannot act on SIGTERM: every job with a frozen rank waited the full 30 s",
        when="python -m largelm.ds_launcher, launches on this node",
        test="tests/test_launch.py::test_launcher_ends_a_stopped_rank_without_waiting_30_s",
    ),
)


def install_deepspeed_compat(engine, cfg: Config, world_size: int) -> list[str]:
    """Apply every engine patch of ``PATCHES`` whose condition holds for ``engine`` (just built by
    ``deepspeed.initialize`` from ``cfg``); returns their names in the order applied. Call once per engine.

    Rank 0 prints one line naming them (and, first, the ZeRO stage DeepSpeed runs when one data-parallel replica
    made it differ from ``parallel.zero_stage``). Raises RuntimeError for a DeepSpeed other than
    ``DEEPSPEED_VERSION``.
    """
    version = check_deepspeed_version()
    stage = engine_zero_stage(cfg, world_size)
    applied = []
    # the order matters: fused_clip needs fused_adamw's fused groups; the guard wraps the step zero0_grad_norm hooks
    if use_fused_adamw(engine.optimizer):
        applied.append("fused_adamw")
    if accumulate_bf16_gradients_in_place(engine.optimizer):
        applied.append("bf16_grad_in_place")
    if clip_inside_fused_adamw(engine.optimizer):
        applied.append("fused_clip")
    if stage == 0 and not is_bf16(cfg):
        report_zero0_grad_norm(engine)
        applied.append("zero0_grad_norm")
    if skips_data_parallel_reduction(cfg, world_size):
        skip_data_parallel_allreduce(engine)
        applied.append("skip_dp_allreduce")
    if install_overflow_guard(engine):
        applied.append("overflow_guard")
    if install_safe_checkpoint_engine(engine):
        applied.append("safe_checkpoint_engine")
    if not dist.is_initialized() or dist.get_rank() == 0:
        if stage != cfg.parallel.zero_stage:
            print(f"one data-parallel replica: DeepSpeed runs ZeRO-{stage} for parallel.zero_stage="
                  f"{cfg.parallel.zero_stage} (same math, nothing to partition; parallel.single_replica_zero)",
                  flush=True)
        print(f"deepspeed_compat (DeepSpeed {version}): {', '.join(applied) or 'nothing'}", flush=True)
    return applied

"""Generate the DeepSpeed JSON config from the typed largelm Config (the only place it is defined)."""

from __future__ import annotations

from largelm.config import Config
from largelm.hardware import is_bf16


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The dict passed as ``config=`` to ``deepspeed.initialize``.

    The optimizer is DeepSpeed's (torch AdamW underneath, so it runs on CPU and GPU alike); the LR schedule is
    ours (``largelm.train.schedule``) because DeepSpeed's schedulers cannot express Megatron's "warm up from 0,
    decay to min_lr" exactly.
    """
    t, o, p = cfg.train, cfg.optimizer, cfg.parallel
    dp = cfg.data_parallel_size(world_size)
    stage = engine_zero_stage(cfg, world_size)
    bf16 = is_bf16(cfg)
    ds: dict = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp,
        "gradient_clipping": o.grad_clip,
        "steps_per_print": 10**9,  # largelm logs itself
        "wall_clock_breakdown": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,  # no fused CUDA kernel needed; fp32 master weights live in the ZeRO optimizer
                "adam_w_mode": True,
            },
        },
        "zero_optimization": _zero_section(stage, reduce_bucket_elements(cfg)),
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
    }
    if bf16 and stage >= 1:
        # Accumulate gradients in fp32 across micro-batches (bf16 accumulation loses small updates). DeepSpeed
        # supports that only with ZeRO >= 1; ZeRO-0 + bf16 keeps fp32 master weights (FP16_Optimizer with bf16
        # params) but accumulates micro-batch gradients in bf16.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if bf16 and stage == 1:
        # ZeRO-1 + bf16 runs DeepSpeed's BF16_Optimizer. By default it keeps every parameter's bf16 gradient alive
        # next to its fp32 accumulation buffer until the step; immediate_grad_update adds each micro-batch's bf16
        # gradient into the fp32 buffer in the backward hook and frees it (gpt-25m at DP=2: 156.7 -> 104.5 MiB
        # of gradients, same sums; bench/p5_memory.py). The pipeline engine supports it (tied-weight gradients are
        # all-reduced from the fp32 buffers).
        ds["bf16"]["immediate_grad_update"] = True
    if p.pipeline_parallel > 1:
        # pipe_/grad_partitioned: send 1/tp of each activation (gradient) between stages and all-gather it in the
        # TP group on arrival. Valid only when the tensor is identical on every TP rank, which sequence
        # parallelism breaks (each TP rank holds its own [s/tp, b, h] slice), so it is off with SP.
        ds["pipeline"] = {"activation_checkpoint_interval": 0,
                          "pipe_partitioned": not p.sequence_parallel,
                          "grad_partitioned": not p.sequence_parallel}
    return ds


def engine_zero_stage(cfg: Config, world_size: int) -> int:
    """The ZeRO stage DeepSpeed runs: ``parallel.zero_stage``, except on a single data-parallel replica.

    ZeRO partitions optimizer state (1), gradients (2) and weights (3) across the data-parallel ranks; with one
    replica each stage keeps the whole state on the rank, and stages 2/3 (and ZeRO-1 in fp32) only add work: per-
    parameter gradient hooks copying into reduction buckets and flat partitions every micro-batch (7-15% of a step
    on one CPU process, bench/p1_overhead.py). So with one replica and no pipeline largelm runs the cheapest engine
    with the same arithmetic - ZeRO-0 in fp32 (torch AdamW on the fp32 parameters, fp32 gradients), ZeRO-1 in bf16
    (DeepSpeed's BF16_Optimizer: fp32 master weights *and* fp32 gradient accumulation, which ZeRO-0 + bf16 lacks).
    ``parallel.single_replica_zero: as_configured`` keeps the configured stage. The checkpoint converter derives
    the same stage from a checkpoint's config and world size, and a resume needs the same world size and stage.
    """
    p = cfg.parallel
    if (p.zero_stage == 0 or p.single_replica_zero == "as_configured" or p.pipeline_parallel > 1
            or cfg.data_parallel_size(world_size) > 1):
        return p.zero_stage
    return 1 if is_bf16(cfg) else 0


def skips_data_parallel_reduction(cfg: Config, world_size: int) -> bool:
    """True when the engine's data-parallel gradient all-reduce is an identity that need not run: one replica, and
    an optimizer that does not use the reduction to fill ZeRO partitions (ZeRO-0, or bf16 ZeRO-1's BF16_Optimizer).
    DeepSpeed would otherwise flatten every gradient into a bucket, all-reduce it over a group of one, divide by 1
    and copy it back after every accumulation boundary (~20 ms of a 310 ms gpt-25m bf16 step on CPU)."""
    stage = engine_zero_stage(cfg, world_size)
    return cfg.data_parallel_size(world_size) == 1 and (stage == 0 or (stage == 1 and is_bf16(cfg)))


# DeepSpeed's default ZeRO gradient-reduction bucket: 5e8 elements, allocated whole (1 GB in bf16).
DEEPSPEED_DEFAULT_BUCKET = 500_000_000


def reduce_bucket_elements(cfg: Config) -> int:
    """ZeRO ``reduce_bucket_size``: 1/16 of this rank's (TP x PP shard of the) parameters, at least 2**22 elements
    (8 MiB in bf16) and at most DeepSpeed's default of 5e8.

    DeepSpeed allocates the whole bucket whatever the model size, and ZeRO-3 keeps it for the entire run: with the
    default, a 27M-parameter model at DP=2 held 954 MiB of bucket next to 235 MiB of ZeRO-3-partitioned state
    (bench/p5_memory.py). 1/16 of the gradients costs at most ~6% of a bf16 gradient, within ZeRO-3's 10% budget
    even at DP=8, and means at most 16 reductions per backward pass (NCCL reaches full bandwidth long before 1/16
    of a 1B model, ~80M elements). The floor keeps small models at one or a few reductions per pass: every
    collective call has a fixed cost (64K-element buckets made a 1.3M-parameter model's ZeRO-3 step ~40% slower
    on CPU). Bucketing changes only how gradients are chunked for communication, not the sums.
    """
    m = cfg.model
    layer = m.hidden_size * (m.hidden_size + 2 * m.kv_groups * (m.hidden_size // m.num_attention_heads))
    layer += m.hidden_size * m.hidden_size + (3 if m.style == "llama" else 2) * m.hidden_size * m.ffn_size
    vocab = m.padded_vocab_size() if m.vocab_size is not None else 0
    params = (m.num_layers * layer + vocab * m.hidden_size) // cfg.parallel.model_parallel
    return int(min(DEEPSPEED_DEFAULT_BUCKET, max(2**22, params // 16)))


def _zero_section(stage: int, bucket: int) -> dict:
    zero: dict = {"stage": stage}
    if stage >= 1:
        zero.update({"contiguous_gradients": True, "overlap_comm": False, "reduce_scatter": True,
                     "reduce_bucket_size": bucket})
    return zero

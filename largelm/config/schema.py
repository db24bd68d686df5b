"""The config's schema: one pydantic model per section (``extra="forbid"``: a misspelt field is an error that
names it) and ``Config``, whose validators hold the cross-field rules."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from largelm.config.distill import DistillConfig, check_distill_alignment, check_distill_layout
from largelm.config.eval import EvalConfig
from largelm.config.moe import MoEConfig, check_moe


class ConfigError(ValueError):
    """A config file or field is wrong; the message names the file and the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Model *shape*. The parallel building blocks are chosen by the layer spec (largelm.model.specs)."""

    # Fields that fix the parameter shapes: a checkpoint written with other values cannot be resumed as it is
    # (preflight), and the converter keeps them when it reshards.
    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "arch", "style", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
        "vocab_size", "make_vocab_size_divisible_by", "tie_embeddings", "max_position_embeddings")

    # A registered architecture (largelm/model/registry.py: gpt, bert); looked up there when the model is built,
    # so an architecture added to the registry needs no change here.
    arch: str = Field(default="gpt", min_length=1)
    # gpt2: LayerNorm, GeLU MLP, learned absolute positions, biases.
    # llama: RMSNorm, SwiGLU MLP, rotary positions, no biases, optional GQA.
    style: Literal["gpt2", "llama"] = "gpt2"
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_query_groups: Optional[int] = Field(default=None, gt=0, description="GQA groups; None = MHA")
    ffn_hidden_size: Optional[int] = Field(default=None, gt=0, description="default 4*hidden (gpt2)")
    seq_length: int = Field(gt=0)
    max_position_embeddings: Optional[int] = Field(default=None, gt=0)
    # Filled from the tokenizer when left empty; padded up for tensor-parallel vocab sharding.
    vocab_size: Optional[int] = Field(default=None, gt=0)
    make_vocab_size_divisible_by: int = Field(default=128, gt=0)
    tie_embeddings: bool = True
    rotary_base: float = Field(default=10000.0, gt=0)
    norm_epsilon: float = Field(default=1e-5, gt=0)
    hidden_dropout: float = Field(default=0.0, ge=0, lt=1)
    attention_dropout: float = Field(default=0.0, ge=0, lt=1)
    init_method_std: float = Field(default=0.02, gt=0)
    # Which kernel computes causal attention (not part of the shape; largelm/model/attention.py): auto = torch's
    # fused scaled_dot_product_attention on GPU, largelm's batched-matmul attention on CPU; local = megatron's.
    attention: Literal["auto", "sdpa", "bmm", "local"] = "auto"
    # Mixture-of-experts MLPs; set exactly when arch is "moe"
    moe: Optional[MoEConfig] = None

    @model_validator(mode="after")
    def _check_shape(self) -> "ModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        groups = self.num_query_groups
        if groups is not None and self.num_attention_heads % groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={groups}"
            )
        if self.max_position_embeddings is not None and self.max_position_embeddings < self.seq_length:
            raise ValueError(
                f"model.max_position_embeddings={self.max_position_embeddings} is smaller than "
                f"model.seq_length={self.seq_length}"
            )
        return self

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.style == "llama":  # Llama rule: 2/3 * 4h rounded up to a multiple of 256
            return 256 * math.ceil(int(8 * self.hidden_size / 3) / 256)
        return 4 * self.hidden_size

    @property
    def kv_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        if self.vocab_size is None:
            raise ConfigError("model.vocab_size is not set (it is read from the tokenizer before building)")
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return multiple * math.ceil(self.vocab_size / multiple)


class DatasetSpec(_Section):
    path: str = Field(description="directory holding manifest.json and the tar shards, or an http(s):// or s3:// "
                                  "prefix holding them (largelm/data/remote.py)")
    weight: float = Field(default=1.0, gt=0)


class DataConfig(_Section):
    train: list[DatasetSpec] = Field(min_length=1)
    valid: list[DatasetSpec] = Field(default_factory=list)
    num_workers: int = Field(default=1, ge=0)
    shuffle_buffer: int = Field(default=1000, ge=0)
    seed: int = 1234
    skip_bad_samples: bool = False
    # Remote shards (http(s)://, s3://): a request failing for remote_timeout_s (retried with exponential backoff
    # meanwhile) ends the run; a connect or read stalled for remote_read_timeout_s fails the request.
    remote_timeout_s: float = Field(default=300.0, gt=0)
    remote_read_timeout_s: float = Field(default=60.0, gt=0)
    remote_ca_file: Optional[str] = Field(default=None, description="PEM bundle of the CA certificates that verify "
                                          "https:// and s3:// endpoints (instead of the system's), for servers "
                                          "whose certificates a private CA signed")
    cache_dir: Optional[str] = Field(default=None, description="keep downloaded remote shards here (by sha256) for "
                                     "later epochs and runs")
    cache_max_bytes: int = Field(default=0, ge=0, description="cache size bound, least recently used first out; "
                                 "0: unbounded")


class TokenizerConfig(_Section):
    model: str = Field(description="path to a sentencepiece .model file")


class ParallelConfig(_Section):
    tensor_parallel: int = Field(default=1, ge=1)
    pipeline_parallel: int = Field(default=1, ge=1)
    sequence_parallel: bool = False
    virtual_pipeline: Optional[int] = Field(default=None, ge=1)
    # Expert parallelism (model.arch: moe): the experts are split over this many data-parallel ranks
    expert_parallel: int = Field(default=1, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 1
    single_replica_zero: Literal["fastest", "as_configured"] = Field(
        default="fastest",
        description="one data-parallel replica (no PP): run the cheapest ZeRO engine with the same math instead of "
                    "zero_stage (ZeRO-0 in fp32, ZeRO-1 in bf16); see deepspeed_config.engine_zero_stage")
    backend: Optional[Literal["nccl", "gloo"]] = Field(default=None, description="default: nccl if CUDA else gloo")
    # Rendezvous and collective timeout (seconds). A dead peer is noticed within seconds anyway (broken connection);
    # a frozen or cut-off one only by this and by train.hang_timeout_s. torch's default is 30 minutes.
    timeout_s: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "ParallelConfig":
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tensor_parallel > 1")
        if self.pipeline_parallel > 1 and self.zero_stage > 1:
            raise ValueError(
                f"parallel.zero_stage={self.zero_stage} with parallel.pipeline_parallel={self.pipeline_parallel}: "
                "DeepSpeed's pipeline engine supports only ZeRO stage 0 or 1"
            )
        if self.virtual_pipeline is not None and self.pipeline_parallel == 1:
            raise ValueError("parallel.virtual_pipeline needs parallel.pipeline_parallel > 1")
        return self

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel


class OptimizerConfig(_Section):
    lr: float = Field(default=3e-4, gt=0)
    min_lr: float = Field(default=3e-5, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, gt=0, lt=1)
    beta2: float = Field(default=0.95, gt=0, lt=1)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float = Field(default=1.0, ge=0, description="0 disables clipping")

    @model_validator(mode="after")
    def _check(self) -> "OptimizerConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"optimizer.min_lr={self.min_lr} is larger than optimizer.lr={self.lr}")
        return self


class TrainConfig(_Section):
    steps: int = Field(gt=0, description="optimizer steps")
    micro_batch_size: int = Field(default=1, gt=0)
    grad_accum_steps: int = Field(default=1, gt=0)
    # auto: bf16 where the device multiplies it natively (CUDA sm_80+, a CPU with AVX512_BF16/AMX), else fp32; a
    # resumed run keeps its checkpoint's precision. Resolved by preflight (largelm.hardware.choose_precision).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    _precision_choice: Any = PrivateAttr(default=None)  # preflight's decision and its reason (for the log)
    seed: int = 1234
    eval_interval: int = Field(default=100, ge=0, description="0 disables validation")
    eval_steps: int = Field(default=10, gt=0)
    log_interval: int = Field(default=10, gt=0)
    max_bad_steps: int = Field(default=5, gt=0, description="abort after this many consecutive NaN/inf steps")
    # Optional loss-spike detector: a step whose loss exceeds this factor x the running mean of recent losses is
    # logged and counted (train/loss_spikes); the update is kept. None disables it.
    loss_spike_factor: Optional[float] = Field(default=None, gt=1)
    # Stop this run after so many steps (checkpointing first), like Megatron's --exit-interval: for jobs with a
    # wall-clock limit that resume where they stopped. The schedule still spans ``steps``.
    exit_interval: Optional[int] = Field(default=None, gt=0)
    # Activation recompute (megatron-core's): "selective" recomputes core attention in backward, "full" every
    # transformer layer's forward (one layer per checkpoint) - less activation memory for more compute.
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    # A rank that makes no progress (no finished step or validation batch; checkpoint saves count as progress) for
    # this long dumps its stacks and exits 43 so the job ends on every host and is requeued (largelm/train/watchdog.py).
    # 0 turns hang detection off. Set it above your slowest step.
    hang_timeout_s: float = Field(default=900.0, ge=0)


class CheckpointConfig(_Section):
    dir: str = "runs/default/checkpoints"
    save_interval: int = Field(default=100, ge=0, description="0 saves only at the end")
    keep_last: int = Field(default=3, ge=1)
    resume: bool = True
    # Resume a checkpoint written in another parallel layout (world size, TP/PP/DP size, ZeRO stage) by resharding
    # its full state, optimizer included (largelm/checkpoint/elastic.py). Off: such a resume is refused, naming
    # the change (a resume in the same layout is the exact, bitwise path either way).
    reshard_on_resume: bool = False
    # A save is progress (train.hang_timeout_s does not apply), but it also waits in collectives: a rank whose save
    # makes no progress for this long (a peer frozen or cut off mid-save, storage stalled) dumps its stacks and
    # exits 43 like a hang. Set it above your slowest save. 0: no bound.
    save_timeout_s: float = Field(default=1800.0, ge=0)


# Characters W&B refuses in project and entity names (its URLs are built from them).
_WANDB_FORBIDDEN = "/\\#?%:"


class WandbConfig(_Section):
    """Weights & Biases mirror of the tensorboard scalars (largelm/train/wandb_log.py): same tags, same steps
    (as the ``train/step`` x-axis), from rank 0, with the resolved config as the W&B run config. The run id is
    kept in ``checkpoint.dir/wandb_run_id``: a resumed training run continues the same W&B run."""

    project: str = Field(min_length=1, max_length=128)
    entity: Optional[str] = Field(default=None, min_length=1, description="team or user; None: W&B's default")
    name: Optional[str] = Field(default=None, min_length=1, description="display name; None: the config's name")
    # online: stream to the server (a failure to start it is a warning and the run is recorded offline);
    # offline: record under ``dir`` only, upload later with ``wandb sync DIR/wandb/offline-run-*``.
    mode: Literal["online", "offline", "disabled"] = "online"
    dir: Optional[str] = Field(default=None, min_length=1, description="W&B writes DIR/wandb/; None: W&B's default")
    # Bounds on W&B's waits (its own settings): start-up, and the upload at the end of the run (then the
    # rest stays on disk for ``wandb sync``); training never waits longer on W&B.
    init_timeout_s: float = Field(default=90.0, gt=0)
    finish_timeout_s: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _check_names(self) -> "WandbConfig":
        for field in ("project", "entity"):
            value = getattr(self, field)
            bad = sorted({c for c in value or "" if c in _WANDB_FORBIDDEN})
            if bad:
                raise ValueError(f"logging.wandb.{field}={value!r} contains {bad}: W&B names cannot contain any "
                                 f"of {list(_WANDB_FORBIDDEN)}")
        return self


class LoggingConfig(_Section):
    tensorboard_dir: Optional[str] = "runs/default/tensorboard"
    progress_bar: bool = True
    # MFU denominator per rank, e.g. 989 for an H100 in bf16. None: measured with a matmul at start-up.
    peak_tflops_per_rank: Optional[float] = Field(default=None, gt=0)
    # None: no W&B (wandb is not even imported).
    wandb: Optional[WandbConfig] = None


class BertConfig(_Section):
    """BERT pretraining objective (``model.arch: bert``); masking runs in the data pipeline
    (largelm.data.bert_masking)."""

    mask_prob: float = Field(default=0.15, gt=0, lt=1, description="fraction of real tokens chosen for MLM")
    mask_token_prob: float = Field(default=0.8, ge=0, le=1, description="chosen -> [MASK]")
    random_token_prob: float = Field(default=0.1, ge=0, le=1, description="chosen -> random token; rest kept")
    whole_word_masking: bool = False
    objective: Literal["sop", "nsp"] = Field(default="sop", description="pair label the shards were written with")
    binary_head: bool = Field(default=True, description="train the SOP/NSP head (loss = MLM + pair loss)")
    # false: megatron-core's pre-LN BERT layer (exports to MegatronBertForMaskedLM). true: the residual starts after
    # each LayerNorm (Megatron-LM's --apply-residual-connection-post-layernorm) = original post-LN BERT, which
    # exports to BertForMaskedLM. See largelm/model/bert_layers.py.
    residual_post_layernorm: bool = False

    @model_validator(mode="after")
    def _check(self) -> "BertConfig":
        if self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError(f"bert.mask_token_prob={self.mask_token_prob} + bert.random_token_prob="
                             f"{self.random_token_prob} exceeds 1")
        return self


class Config(_Section):
    name: str = "run"
    model: ModelConfig
    tokenizer: TokenizerConfig
    data: DataConfig
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    bert: Optional[BertConfig] = Field(default=None, description="model.arch=bert only; defaults filled in")
    distill: Optional[DistillConfig] = None
    eval: Optional[EvalConfig] = Field(default=None, description="lm-evaluation-harness during training")

    @model_validator(mode="after")
    def _check_cross(self) -> "Config":
        m, p = self.model, self.parallel
        if m.num_attention_heads % p.tensor_parallel:
            raise ValueError(
                f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                f"parallel.tensor_parallel={p.tensor_parallel}"
            )
        if m.kv_groups % p.tensor_parallel:
            raise ValueError(
                f"model.num_query_groups={m.kv_groups} is not divisible by parallel.tensor_parallel={p.tensor_parallel}"
            )
        stages = p.pipeline_parallel * (p.virtual_pipeline or 1)
        if m.num_layers % stages:
            raise ValueError(
                f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline_parallel x "
                f"parallel.virtual_pipeline = {stages}"
            )
        if p.pipeline_parallel > 1 and self.train.grad_accum_steps < p.pipeline_parallel:
            raise ValueError(
                f"train.grad_accum_steps={self.train.grad_accum_steps} (micro-batches per step) is smaller than "
                f"parallel.pipeline_parallel={p.pipeline_parallel}: the pipeline would never fill"
            )
        if self.optimizer.warmup_steps > self.train.steps:
            raise ValueError(
                f"optimizer.warmup_steps={self.optimizer.warmup_steps} exceeds train.steps={self.train.steps}"
            )
        if self.distill is not None:
            check_distill_layout(m, p, self.distill)
            check_distill_alignment(self.distill, m, self.train.activation_checkpointing)
        if self.eval is not None and (m.arch != "gpt" or p.virtual_pipeline):
            raise ValueError(
                "eval: in-training evaluation scores next-token predictions of a GPT run through its own stages, so "
                f"it needs model.arch='gpt' and no parallel.virtual_pipeline (got arch={m.arch!r}, "
                f"virtual_pipeline={p.virtual_pipeline}); evaluate such a run's checkpoints with largelm-eval instead"
            )
        check_moe(m, p)
        if m.arch == "bert" and m.style != "gpt2":
            raise ValueError("model.style must be 'gpt2' (post-LN-free BERT layout) when model.arch is 'bert'")
        if m.arch != "bert" and self.bert is not None:
            raise ValueError(f"bert: this section is for model.arch 'bert', the model is {m.arch!r}")
        if m.arch == "bert":
            if self.bert is None:
                self.bert = BertConfig()
        return self

    # --- derived quantities -------------------------------------------------------------------------
    def data_parallel_size(self, world_size: int) -> int:
        mp = self.parallel.model_parallel
        if world_size % mp:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor_parallel x "
                f"parallel.pipeline_parallel = {mp}"
            )
        return world_size // mp

    def global_batch_size(self, world_size: int) -> int:
        return self.train.micro_batch_size * self.train.grad_accum_steps * self.data_parallel_size(world_size)

    def tokens_per_step(self, world_size: int) -> int:
        return self.global_batch_size(world_size) * self.model.seq_length

    def check_world_size(self, world_size: int) -> None:
        """Validate the layout against the launcher's world size (before any process group starts)."""
        dp = self.data_parallel_size(world_size)
        ep = self.parallel.expert_parallel
        if dp % ep:
            raise ConfigError(
                f"parallel.expert_parallel={ep} does not divide the data-parallel size {dp} (world size "
                f"{world_size} / (parallel.tensor_parallel x parallel.pipeline_parallel)): expert-parallel ranks "
                "are data-parallel ranks")

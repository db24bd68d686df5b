"""Model + DeepSpeed engine construction, and the step functions that drive them.

The trainer (loop, logging, checkpoints) is the same for every model; what differs - which model is built, how a
micro-batch becomes a loss, how an optimizer step is driven - lives here:

* ``DenseStep``: a whole model per rank (data + tensor parallel, any ZeRO stage); DeepSpeed's engine runs
  forward/backward/step per micro-batch and steps the optimizer at the accumulation boundary.
* ``PipelineStep``: ``pipeline_parallel > 1``; one pipeline stage per rank (``largelm.model.pipeline``) under
  DeepSpeed's PipelineEngine, which runs the 1F1B schedule over the step's micro-batches and steps the optimizer
  (ZeRO 0/1 only). See docs/design.md "Parallelism".
* ``BertStep``: ``model.arch: bert``; megatron-core's BertModel (MLM + SOP/NSP), otherwise like ``DenseStep``;
  exposes ``last_metrics``/``last_eval_metrics`` for the trainer to log. See docs/design.md "BERT".
* ``BertPipelineStep``: BERT with ``pipeline_parallel > 1`` (``largelm.model.bert_pipeline``) under the
  PipelineEngine like ``PipelineStep``, with ``BertStep``'s metrics.

Both return the same quantity from ``train_step``: this data-parallel replica's mean loss over the step's
micro-batches (the trainer averages it over data-parallel ranks), and ``engine.get_global_grad_norm()`` is the
norm of the whole model's gradient (before clipping) on every rank.
"""

from __future__ import annotations

from typing import Iterator, Optional

import deepspeed
import torch
import torch.distributed as dist

from largelm.config import Config
from largelm.hardware import model_dtype
from largelm.model.gpt import build_gpt_model, gpt_forward_loss, split_tokens
from largelm.model.pipeline import build_gpt_pipeline
from largelm.model.specs import recompute_fields
from largelm.model.weights import load_full_state_dict
from largelm.parallel import groups
from largelm.parallel.deepspeed_compat import install_deepspeed_compat
from largelm.parallel.deepspeed_config import deepspeed_config
from largelm.train.optim import param_groups
from largelm.train.schedule import build_scheduler


def initialize_engine(cfg: Config, model: torch.nn.Module, world_size: int, mpu=None):
    """Wrap ``model`` in a DeepSpeed engine configured from ``cfg`` (optimizer, ZeRO, bf16, LR schedule), with
    largelm's DeepSpeed patches for this run installed (``largelm.parallel.deepspeed_compat``)."""
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optimizer.weight_decay),
        config=deepspeed_config(cfg, world_size),
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.optimizer, cfg.train.steps),
        mpu=mpu,
        dist_init_required=False,
    )
    install_deepspeed_compat(engine, cfg, world_size)
    return engine


class DenseStep:
    """GPT without pipeline parallelism: every rank holds all layers (its TP shard of them)."""

    def __init__(self, cfg: Config, world_size: int, init_state_dict: Optional[dict] = None):
        self.cfg = cfg
        model = build_gpt_model(cfg.model, cfg.parallel, vocab_size=cfg.model.vocab_size, dtype=model_dtype(cfg),
                                **recompute_fields(cfg.train.activation_checkpointing))
        if init_state_dict is not None:
            load_full_state_dict(model, init_state_dict)
        self.engine = initialize_engine(cfg, model, world_size, mpu=groups.DeepSpeedMPU())
        self.device = groups.device()

    def train_step(self, batches: Iterator[dict]) -> torch.Tensor:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns this rank's mean loss."""
        self.engine.train()
        losses = []
        for _ in range(self.cfg.train.grad_accum_steps):
            _, loss = gpt_forward_loss(self.engine, next(batches)["tokens"])
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        self.engine.eval()
        return gpt_forward_loss(self.engine, batch["tokens"])[1]


class PipelineStep:
    """GPT with pipeline parallelism: this rank holds one stage (its TP shard of it) in a DeepSpeed PipelineEngine.

    Every rank of a pipeline reads the same micro-batches (its data-parallel rank's); DeepSpeed feeds the inputs to
    the first stage and the labels to the last. ``train_step`` runs one ``train_batch`` (``grad_accum_steps``
    micro-batches through the 1F1B schedule, tied-gradient and data-parallel all-reduce, optimizer step).
    """

    def __init__(self, cfg: Config, world_size: int, init_state_dict: Optional[dict] = None):
        self.cfg = cfg
        module = build_gpt_pipeline(cfg.model, cfg.parallel, vocab_size=cfg.model.vocab_size, dtype=model_dtype(cfg),
                                    activation_checkpointing=cfg.train.activation_checkpointing)
        if init_state_dict is not None:
            load_full_state_dict(module, init_state_dict)
            with torch.no_grad():  # no-op when loaded right; cheap insurance that the tied copies agree
                module._synchronize_tied_weights()
        # mpu=None: DeepSpeed takes the module's pipeline grid as its mpu (checked against megatron's groups).
        self.engine = initialize_engine(cfg, module, world_size, mpu=None)
        self.device = groups.device()

    def _micro_batches(self, batches: Iterator[dict], count: int) -> Iterator[tuple]:
        # Drawn up front on *every* rank (middle stages too), so all ranks' loaders stay at the same position
        # and a checkpoint's data state is the same on each of them.
        micro = []
        for _ in range(count):
            input_ids, labels, _ = split_tokens(next(batches)["tokens"])
            micro.append(((input_ids,), labels))
        return iter(micro)

    def train_step(self, batches: Iterator[dict]) -> torch.Tensor:
        """One optimizer step; returns this data-parallel replica's mean loss over the micro-batches (on every
        stage: DeepSpeed broadcasts it from the last stage)."""
        self.engine.train_batch(self._micro_batches(batches, self.cfg.train.grad_accum_steps))
        # train_batch's return value is already averaged over data-parallel ranks; dp_group_loss is this
        # replica's own mean, the same quantity DenseStep returns (the trainer does the DP average).
        return self.engine.dp_group_loss.detach().float()

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        """Mean loss of one batch on this data-parallel replica (collective over the pipeline: all ranks call)."""
        outputs = self.engine.eval_batch(self._micro_batches(iter([batch]), 1), num_micro_batches=1,
                                         reduce_output=None, bcast_loss=False)
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.engine.is_last_stage():
            loss = torch.stack([o.float() for o in outputs]).mean()
        dist.broadcast(loss, src=self.engine.grid.stage_to_global(self.engine.num_stages - 1),
                       group=self.engine.grid.get_pipe_parallel_group())
        return loss


class BertStep:
    """BERT (``model.arch: bert``): MLM + SOP/NSP on megatron-core's BertModel (``largelm.model.bert``); data and
    tensor parallel, any ZeRO stage, driven like ``DenseStep``.

    Batches come from the loader with ``BertMasker`` (dynamic masking in the data pipeline). ``train_step`` returns
    this replica's mean of ``mlm_loss + pair_loss`` and leaves ``last_metrics`` (``train/mlm_loss``,
    ``train/mlm_acc``, ``train/sop_loss``, ``train/sop_acc``; ``nsp_*`` with the NSP objective: means over the
    step's micro-batches); ``eval_loss`` leaves ``last_eval_metrics`` (same names under ``valid/``).
    """

    def __init__(self, cfg: Config, world_size: int, init_state_dict: Optional[dict] = None):
        from largelm.model.bert import build_bert_model

        self.cfg = cfg
        model = build_bert_model(cfg.model, cfg.parallel, cfg.bert, vocab_size=cfg.model.vocab_size,
                                 dtype=model_dtype(cfg), **recompute_fields(cfg.train.activation_checkpointing))
        if init_state_dict is not None:
            load_full_state_dict(model, init_state_dict)
        self.engine = initialize_engine(cfg, model, world_size, mpu=groups.DeepSpeedMPU())
        self.device = groups.device()
        self.last_metrics: dict[str, float] = {}
        self.last_eval_metrics: dict[str, float] = {}

    def _forward(self, batch: dict) -> dict:
        from largelm.model.bert import bert_forward_metrics

        return bert_forward_metrics(self.engine, batch, self.cfg.bert.objective)

    def train_step(self, batches: Iterator[dict]) -> torch.Tensor:
        self.engine.train()
        parts = []
        for _ in range(self.cfg.train.grad_accum_steps):
            out = self._forward(next(batches))
            self.engine.backward(out["loss"])
            self.engine.step()
            parts.append({k: v.detach() for k, v in out.items()})
        means = {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}
        self.last_metrics = {f"train/{k}": v.item() for k, v in means.items() if k != "loss"}
        return means["loss"]

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        self.engine.eval()
        out = self._forward(batch)
        self.last_eval_metrics = {f"valid/{k}": v.item() for k, v in out.items() if k != "loss"}
        return out["loss"].detach()


class BertPipelineStep(PipelineStep):
    """BERT with pipeline parallelism (``largelm.model.bert_pipeline``): the PipelineEngine drives the step as for
    GPT; the last stage computes the same loss and metrics as ``BertStep`` (``bert_metrics_from_logits``) and
    broadcasts their means over the pipeline, so every rank returns the loss and leaves ``last_metrics`` /
    ``last_eval_metrics`` under the names ``BertStep`` uses."""

    def __init__(self, cfg: Config, world_size: int, init_state_dict: Optional[dict] = None):
        from largelm.model.bert_pipeline import build_bert_pipeline

        self.cfg = cfg
        module = build_bert_pipeline(cfg.model, cfg.parallel, cfg.bert, vocab_size=cfg.model.vocab_size,
                                     dtype=model_dtype(cfg), activation_checkpointing=cfg.train.activation_checkpointing)
        if init_state_dict is not None:  # full (TP=1) BertModel weights
            load_full_state_dict(module, init_state_dict)
            with torch.no_grad():
                module._synchronize_tied_weights()
        self.metric_names = module.metric_names
        self.loss_fn = module.loss_fn
        self.engine = initialize_engine(cfg, module, world_size, mpu=None)
        self.device = groups.device()
        self.last_metrics: dict[str, float] = {}
        self.last_eval_metrics: dict[str, float] = {}

    def _micro_batches(self, batches: Iterator[dict], count: int) -> Iterator[tuple]:
        micro = []
        for _ in range(count):  # drawn on every rank, as in PipelineStep
            b = next(batches)
            micro.append(((b["input_ids"], b["attention_mask"], b["token_type_ids"]),
                          (b["mlm_labels"], b["pair_label"])))
        return iter(micro)

    def _collect(self) -> dict[str, torch.Tensor]:
        """Means over the micro-batches the last stage just ran, broadcast to every stage of this pipeline."""
        values = torch.zeros(len(self.metric_names), dtype=torch.float32, device=self.device)
        if self.engine.is_last_stage():
            records = self.loss_fn.records
            values = torch.stack([torch.stack([r[k] for r in records]).mean() for k in self.metric_names])
            values = values.to(self.device)
        self.loss_fn.records = []
        dist.broadcast(values, src=self.engine.grid.stage_to_global(self.engine.num_stages - 1),
                       group=self.engine.grid.get_pipe_parallel_group())
        return dict(zip(self.metric_names, values))

    def train_step(self, batches: Iterator[dict]) -> torch.Tensor:
        self.loss_fn.records = []
        self.engine.train_batch(self._micro_batches(batches, self.cfg.train.grad_accum_steps))
        means = self._collect()
        self.last_metrics = {f"train/{k}": v.item() for k, v in means.items() if k != "loss"}
        return means["loss"]

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        self.loss_fn.records = []
        self.engine.eval_batch(self._micro_batches(iter([batch]), 1), num_micro_batches=1, reduce_output=None,
                               bcast_loss=False)
        means = self._collect()
        self.last_eval_metrics = {f"valid/{k}": v.item() for k, v in means.items() if k != "loss"}
        return means["loss"]


def build_step(cfg: Config, world_size: int, init_state_dict: Optional[dict] = None):
    """The step driver for this config's model and layout.

    ``init_state_dict``: full (TP=1) ``GPTModel`` weights (``BertModel`` weights for arch bert) to start from
    instead of the random initialisation; each rank loads its shard before the engine is built (used by the
    parity tests; e.g. converted weights).
    """
    if getattr(cfg, "distill", None) is not None:  # knowledge distillation (largelm/train/distill.py)
        from largelm.train.distill import DistillStep

        return DistillStep(cfg, world_size, init_state_dict)
    if cfg.model.arch == "bert":
        if cfg.parallel.pipeline_parallel > 1:
            return BertPipelineStep(cfg, world_size, init_state_dict)
        return BertStep(cfg, world_size, init_state_dict)
    if cfg.parallel.pipeline_parallel > 1:
        return PipelineStep(cfg, world_size, init_state_dict)
    return DenseStep(cfg, world_size, init_state_dict)

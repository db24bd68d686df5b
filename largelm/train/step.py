"""The step drivers: how one optimizer step runs for the trainer, for any registered architecture.

The trainer (loop, logging, checkpoints) is the same for every model; what differs per architecture - which module
is built, how a batch becomes a loss, how the pipeline takes a micro-batch - comes from its ``ArchSpec``
(largelm/model/registry.py). Two drivers, by layout:

* ``DenseStep``: a whole model per rank (data + tensor parallel, any ZeRO stage); DeepSpeed's engine runs
  forward/backward/step per micro-batch and steps the optimizer at the accumulation boundary. Its training loss is
  the architecture's ``forward_metrics`` or one it is given (distillation: ``largelm.train.distill``).
* ``PipelineStep``: ``pipeline_parallel > 1``; one pipeline stage per rank under DeepSpeed's PipelineEngine, which
  runs the 1F1B schedule over the step's micro-batches and steps the optimizer (ZeRO 0/1 only). See
  docs/design.md "Parallelism". With a ``distill`` section the stage is the student's with the teacher's stage
  beside it (largelm/train/distill_pipeline.py).

Both return the same quantity from ``train_step``: this data-parallel replica's mean loss over the step's
micro-batches (the trainer averages it over data-parallel ranks), and ``engine.get_global_grad_norm()`` is the
norm of the whole model's gradient (before clipping) on every rank. Metrics besides the loss (BERT's
``mlm_loss``/``mlm_acc``/``sop_*``, distillation's ``kl``/``lm_loss``) are left as means over the step's
micro-batches in ``last_metrics`` (``train/<name>``, or ``<prefix>/<name>`` for a loss with a ``metric_prefix``)
and, for one validation batch, in ``last_eval_metrics`` (``valid/<name>``); the trainer logs both.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from largelm.config import Config
from largelm.hardware import model_dtype
from largelm.model.registry import ArchSpec, get_arch
from largelm.model.specs import recompute_fields
from largelm.model.weights import load_full_state_dict, load_tp_shard_state_dict
from largelm.parallel import groups
from largelm.train.distill import build_distill_loss
from largelm.train.distill_pipeline import build_distill_pipeline
from largelm.train.engine import initialize_engine

# (model or engine, batch) -> {"loss": scalar carrying the gradient, other scalar metrics}
TrainLoss = Callable[[torch.nn.Module, dict], dict]


def named(prefix: str, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """The metrics besides the loss as ``<prefix>/<name>`` floats (what the trainer logs)."""
    return {f"{prefix}/{k}": v.item() for k, v in values.items() if k != "loss"}


class DenseStep:
    """Every rank holds all layers (its TP shard of them); the model is the architecture's ``build_model``."""

    def __init__(self, cfg: Config, world_size: int, init_state_dict: Optional[dict] = None,
                 loss: Optional[TrainLoss] = None, init_shard: Optional[dict] = None):
        """``init_shard``: instead of full ``init_state_dict`` weights, this rank's TP shard of the starting weights
        (a distillation student started from its teacher's layers)."""
        self.cfg = cfg
        self.arch: ArchSpec = get_arch(cfg.model.arch)
        model = self.arch.build_model(cfg.model, cfg.parallel, *self.arch.section_args(cfg), dtype=model_dtype(cfg),
                                      **recompute_fields(cfg.train.activation_checkpointing))
        if init_state_dict is not None:
            load_full_state_dict(model, init_state_dict)
        elif init_shard is not None:
            load_tp_shard_state_dict(model, init_shard)
        if hasattr(loss, "extend_student"):  # training-only student modules (BERT distillation's projection)
            loss.extend_student(model)
        self.engine = initialize_engine(cfg, model, world_size, mpu=groups.DeepSpeedMPU())
        self.device = groups.device()
        self.loss = loss or self.arch_loss  # distillation's, or the architecture's own
        self.last_metrics: dict[str, float] = {}
        self.last_eval_metrics: dict[str, float] = {}

    def arch_loss(self, engine: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """The architecture's loss and metrics (``ArchSpec.forward_metrics``); what ``eval_loss`` always uses."""
        return self.arch.forward_metrics(engine, batch, self.cfg)

    def train_step(self, batches: Iterator[dict]) -> torch.Tensor:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns this rank's mean loss."""
        self.engine.train()
        parts = []
        for _ in range(self.cfg.train.grad_accum_steps):
            out = self.loss(self.engine, next(batches))
            self.engine.backward(out["loss"])
            self.engine.step()
            parts.append({k: v.detach() for k, v in out.items()})
        means = {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}
        self.last_metrics = named(getattr(self.loss, "metric_prefix", "train"), means)
        return means["loss"]

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        """The architecture's loss of one batch (with a distillation loss too: the plain LM loss, comparable with
        a run without a teacher)."""
        self.engine.eval()
        out = self.arch_loss(self.engine, batch)
        self.last_eval_metrics = named("valid", out)
        return out["loss"].detach()


class PipelineStep:
    """This rank holds one pipeline stage (its TP shard of it), the architecture's ``build_pipeline``, in a
    DeepSpeed PipelineEngine.

    Every rank of a pipeline reads the same micro-batches (its data-parallel rank's); DeepSpeed feeds the inputs to
    the first stage and the labels to the last. ``train_step`` runs one ``train_batch`` (``grad_accum_steps``
    micro-batches through the 1F1B schedule, tied-gradient and data-parallel all-reduce, optimizer step). A stage
    whose loss records metrics (``loss_fn.records``, named by the module's ``metric_names``; BERT's, distillation's:
    the loss may name fewer for validation, ``eval_metric_names``, and its own ``metric_prefix``) has the last
    stage's means broadcast over the pipeline, so every rank returns the loss and leaves the metrics. Loss parts
    computed on every stage (the module's ``stage_alignment``: BERT distillation's layer alignment) are averaged
    per stage, summed over the pipeline, reported under their names and added, weighted, to the loss.
    """

    def __init__(self, cfg: Config, world_size: int, init_state_dict: Optional[dict] = None,
                 module: Optional[torch.nn.Module] = None):
        """``module``: this rank's stage, already built (distillation's student,
        largelm/train/distill_pipeline.py), instead of the architecture's ``build_pipeline``."""
        self.cfg = cfg
        self.arch: ArchSpec = get_arch(cfg.model.arch)
        if module is None:
            module = self.arch.build_pipeline(cfg.model, cfg.parallel, *self.arch.section_args(cfg),
                                              dtype=model_dtype(cfg),
                                              activation_checkpointing=cfg.train.activation_checkpointing)
        if init_state_dict is not None:  # full (TP=1) dense-model weights
            load_full_state_dict(module, init_state_dict)
            with torch.no_grad():  # no-op when loaded right; cheap insurance that the tied copies agree
                module._synchronize_tied_weights()
        self.metric_names: Optional[list[str]] = getattr(module, "metric_names", None)
        self.loss_fn = module.loss_fn
        # validation may record fewer metrics than training (distillation: the plain LM loss only)
        self.eval_metric_names = getattr(self.loss_fn, "eval_metric_names", self.metric_names)
        self.metric_prefix = getattr(self.loss_fn, "metric_prefix", "train")
        # loss parts computed on every stage (BERT distillation's layer alignment, distill_pipeline_align.py)
        self.stage_parts = getattr(module, "stage_alignment", None)
        # mpu=None: DeepSpeed takes the module's pipeline grid as its mpu (checked against megatron's groups).
        self.engine = initialize_engine(cfg, module, world_size, mpu=None)
        self.device = groups.device()
        self.last_metrics: dict[str, float] = {}
        self.last_eval_metrics: dict[str, float] = {}

    def _micro_batches(self, batches: Iterator[dict], count: int) -> Iterator[tuple]:
        # Drawn up front on *every* rank (middle stages too), so all ranks' loaders stay at the same position
        # and a checkpoint's data state is the same on each of them.
        return iter([self.arch.pipeline_micro_batch(next(batches)) for _ in range(count)])

    def _broadcast_from_last_stage(self, values: torch.Tensor) -> torch.Tensor:
        dist.broadcast(values, src=self.engine.grid.stage_to_global(self.engine.num_stages - 1),
                       group=self.engine.grid.get_pipe_parallel_group())
        return values

    def _summed_over_stages(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each stage's means of the stage parts (``stage_parts.names``), summed over this pipeline's stages."""
        values = values.to(self.device)
        dist.all_reduce(values, group=self.engine.grid.get_pipe_parallel_group())
        return dict(zip(self.stage_parts.names, values))

    def _recorded_means(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Means over the micro-batches the last stage just ran, broadcast to every stage of this pipeline."""
        values = torch.zeros(len(names), dtype=torch.float32, device=self.device)
        if self.engine.is_last_stage():
            records = self.loss_fn.records
            values = torch.stack([torch.stack([r[k].float() for r in records]).mean() for k in names])
            values = values.to(self.device)
        self.loss_fn.records = []
        return dict(zip(names, self._broadcast_from_last_stage(values)))

    def train_step(self, batches: Iterator[dict]) -> torch.Tensor:
        """One optimizer step; returns this data-parallel replica's mean loss over the micro-batches (on every
        stage)."""
        if self.metric_names:
            self.loss_fn.records = []
        if self.stage_parts is not None:
            self.stage_parts.records = []
        self.engine.train_batch(self._micro_batches(batches, self.cfg.train.grad_accum_steps))
        if not self.metric_names:
            # train_batch's return value is already averaged over data-parallel ranks; dp_group_loss is this
            # replica's own mean (DeepSpeed broadcasts it from the last stage), the same quantity DenseStep returns
            # (the trainer does the DP average).
            return self.engine.dp_group_loss.detach().float()
        means = self._recorded_means(self.metric_names)
        if self.stage_parts is not None:
            parts = self._summed_over_stages(self.stage_parts.step_means())
            means["loss"] = means["loss"] + sum(self.stage_parts.weights[k] * v for k, v in parts.items())
            means.update(parts)
        self.last_metrics = named(self.metric_prefix, means)
        return means["loss"]

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        """Mean loss of one batch on this data-parallel replica (collective over the pipeline: all ranks call)."""
        if self.metric_names:
            self.loss_fn.records = []
        outputs = self.engine.eval_batch(self._micro_batches(iter([batch]), 1), num_micro_batches=1,
                                         reduce_output=None, bcast_loss=False)
        if self.metric_names:
            means = self._recorded_means(self.eval_metric_names)
            self.last_eval_metrics = named("valid", means)
            return means["loss"]
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.engine.is_last_stage():
            loss = torch.stack([o.float() for o in outputs]).mean()
        return self._broadcast_from_last_stage(loss)


def build_step(cfg: Config, world_size: int, init_state_dict: Optional[dict] = None):
    """The step driver for this config's architecture and layout.

    ``init_state_dict``: full (TP=1) dense-model weights (``GPTModel``; ``BertModel`` for arch bert) to start from
    instead of the random initialisation; each rank loads its shard before the engine is built (used by the
    parity tests; e.g. converted weights). With a ``distill`` section the step trains against the teacher
    (largelm/train/distill.py; pipelined with the student at PP > 1: largelm/train/distill_pipeline.py), which is
    built first and may give the student's starting weights.
    """
    distills = getattr(cfg, "distill", None) is not None
    if cfg.parallel.pipeline_parallel > 1:
        # distillation: the student's stage with the teacher's stage beside it (and the student's starting weights,
        # if distill.student_init asks for them, this stage's TP shard)
        module = build_distill_pipeline(cfg, init_student=init_state_dict is None) if distills else None
        return PipelineStep(cfg, world_size, init_state_dict, module=module)
    loss = None
    if distills:
        # the student's starting weights, if distill.student_init asks for them: this rank's TP shard
        loss = build_distill_loss(cfg, init_student=init_state_dict is None)
        step = DenseStep(cfg, world_size, init_state_dict, loss=loss, init_shard=loss.student_init)
        loss.student_init = None  # not kept once the student holds it
        return step
    return DenseStep(cfg, world_size, init_state_dict, loss=loss)

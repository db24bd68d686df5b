"""Knowledge distillation with a pipeline-parallel GPT or BERT student (``parallel.pipeline_parallel > 1``).

The teacher is pipelined alongside the student at the same PP (largelm/model/pipeline_distill.py): stage p of the
student's pipeline also runs stage p of the teacher, built from the teacher checkpoint's config with the run's
``parallel`` section (same TP group, same PP, the student's ``make_vocab_size_divisible_by``), frozen, eval mode,
``distill.teacher_precision``; it lives outside the student's module tree, so DeepSpeed's optimizer, ZeRO and
checkpoint files never see it. Each rank reads only its stage's TP shard of the teacher (``teacher_tp_shard`` with a
filter on the stage's layers: the teacher checkpoint's TP ranks that hold a piece of it, whatever layout it was
trained in) and, with ``student_init: every_kth_layer``, its student stage's starting weights from the same read.

The last stage gets ``(student_logits, teacher_logits)`` ([s, b, V/TP], this TP rank's vocabulary partition) and
``PipelineDistillLoss`` computes ``largelm.train.distill.distill_loss`` on them (vocab-parallel KL and CE; the loss
averages over all tokens, so the labels are transposed to the logits' [s, b] order instead of copying the logits);
it records ``loss``/``kl``/``lm_loss`` per micro-batch, which ``PipelineStep`` broadcasts from the last stage and
reports as ``distill/kl``, ``distill/lm_loss`` (the dense distillation path's names). In evaluation the loss is the
plain LM loss (the teacher still runs: the tuple crossing the stages must keep its structure), so validation
compares with a run without a teacher.

BERT (``BertPipelineDistillLoss``): the last stage gets ``(student_logits, student_binary_logits, teacher_logits)``
and computes ``largelm.train.distill_bert.logit_distill_loss`` (T^2 x KL on the masked positions + (1 - alpha) x
(MLM + SOP/NSP), the dense BERT distillation's function, on the logits transposed to its [b, s] order), recording
``kl``, ``mlm_loss``, ``mlm_acc``, ``<sop|nsp>_loss``/``_acc`` (``distill/...``, the dense path's names); validation
is the plain BERT loss and metrics (``valid/...``, as ``DenseStep.eval_loss``). Hidden-state and attention-map
alignment: on the stages holding the aligned layers (largelm/train/distill_pipeline_align.py).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from largelm.config import Config, ConfigError
from largelm.hardware import model_dtype
from largelm.model.bert import bert_metrics_from_logits
from largelm.model.pipeline import lm_loss_from_logits
from largelm.model.pipeline_distill import DistillBertPipelineModule, DistillGPTPipelineModule, DistillStage
from largelm.model.registry import get_arch
from largelm.model.weights import load_tp_shard_state_dict
from largelm.train.distill import distill_loss
from largelm.train.distill_bert import logit_distill_loss
from largelm.train.distill_pipeline_align import StageAlignment
from largelm.train.teacher import every_kth_layer_name, every_kth_layer_state, teacher_config, teacher_tp_shard
from largelm.train.teacher_model import teacher_build_settings


class PipelineDistillLoss:
    """The student pipeline's ``loss_fn`` (last stage): ``distill_loss`` while the module trains, the LM loss in
    evaluation; appends each micro-batch's detached parts to ``records`` (the step driver clears and reads them)."""

    metric_prefix = "distill"  # PipelineStep's last_metrics: distill/kl, distill/lm_loss (as DenseStep's)
    metric_names = ["loss", "kl", "lm_loss"]
    eval_metric_names = ["loss"]

    def __init__(self, module: torch.nn.Module, cfg: Config):
        self.module, self.cfg = module, cfg
        self.records: list[dict[str, torch.Tensor]] = []

    def __call__(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        student_logits, teacher_logits = outputs  # [s, b, V/TP]; labels [b, s]
        if not self.module.training:
            lm = lm_loss_from_logits(student_logits, labels)
            self.records.append({"loss": lm.detach().float()})
            return lm
        d = self.cfg.distill
        total, kl, lm = distill_loss(student_logits, teacher_logits, labels.transpose(0, 1).contiguous(), d.alpha,
                                     d.temperature, self.cfg.model.vocab_size)
        self.records.append({"loss": total.detach(), "kl": kl.detach(), "lm_loss": lm.detach()})
        return total


class BertPipelineDistillLoss:
    """The BERT student pipeline's ``loss_fn`` (last stage): ``logit_distill_loss`` while the module trains, the
    plain BERT loss in evaluation; appends each micro-batch's detached metrics to ``records``."""

    metric_prefix = "distill"

    def __init__(self, module: torch.nn.Module, cfg: Config):
        self.module, self.cfg = module, cfg
        pair = [f"{cfg.bert.objective}_loss", f"{cfg.bert.objective}_acc"] if cfg.bert.binary_head else []
        self.metric_names = ["loss", "kl", "mlm_loss", "mlm_acc"] + pair
        self.eval_metric_names = ["loss", "mlm_loss", "mlm_acc"] + pair  # BERT's own (valid/...), as DenseStep
        self.records: list[dict[str, torch.Tensor]] = []

    def __call__(self, outputs, labels) -> torch.Tensor:
        student_logits, student_binary, teacher_logits = outputs  # [s, b, V/TP]
        mlm_labels, pair_label = labels  # [b, s], [b]
        # [b, s] order, as the dense path's (and BertPipelineLoss's) logits: the same sums in the same order
        student_logits = student_logits.transpose(0, 1).contiguous()
        if not self.module.training:
            out = bert_metrics_from_logits(student_logits, student_binary, mlm_labels,
                                           pair_label if student_binary is not None else None, self.cfg.bert.objective)
            self.records.append({k: v.detach().float() for k, v in out.items()})
            return out["loss"]
        total, parts = logit_distill_loss(student_logits, student_binary, teacher_logits.transpose(0, 1).contiguous(),
                                          mlm_labels, pair_label, self.cfg)
        self.records.append({"loss": total.detach(), **{k: v.float() for k, v in parts.items()}})
        return total


_STAGES = {"gpt": (DistillGPTPipelineModule, PipelineDistillLoss), "bert": (DistillBertPipelineModule,
                                                                          BertPipelineDistillLoss)}


def build_distill_pipeline(cfg: Config, init_student: bool = True) -> DistillStage:
    """This rank's stage of the student (``loss_fn``: ``PipelineDistillLoss`` or ``BertPipelineDistillLoss``,
    ``metric_names`` set for ``PipelineStep``) with its teacher stage attached; with ``init_student`` and
    ``distill.student_init: every_kth_layer`` the student stage starts from the teacher's layers. All ranks call it
    (the pipeline modules create process groups). ``module.teacher_sources``: the teacher checkpoint's TP ranks
    read."""
    if cfg.model.arch not in _STAGES:
        raise ConfigError(f"distill: pipeline-parallel distillation is implemented for model.arch 'gpt' and 'bert' "
                          f"students (got {cfg.model.arch!r})")
    module_cls, loss_cls = _STAGES[cfg.model.arch]
    d = cfg.distill
    teacher_cfg = teacher_config(cfg)  # checked before any weight is read (layers divisible by PP, TP, tokenizer)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    padded = cfg.model.padded_vocab_size(tp)
    # the student first: its random initialisation is what a run without a teacher draws from the same seed
    student_arch = get_arch(cfg.model.arch)
    student = student_arch.build_pipeline(cfg.model, cfg.parallel, *student_arch.section_args(cfg),
                                          dtype=model_dtype(cfg),
                                          activation_checkpointing=cfg.train.activation_checkpointing,
                                          module_cls=module_cls)
    teacher_model, teacher_dtype = teacher_build_settings(cfg, teacher_cfg)
    arch = get_arch(teacher_model.arch)
    # no activation checkpointing: the teacher runs without grad
    teacher = arch.build_pipeline(teacher_model, cfg.parallel, *arch.section_args(teacher_cfg), dtype=teacher_dtype)

    start_student = init_student and d.student_init == "every_kth_layer"

    def student_needs(name: str) -> bool:
        student_name = every_kth_layer_name(name, cfg.model.num_layers, d.k, arch.layer_prefix)
        return student_name is not None and student.holds(student_name)

    def keep(name: str) -> bool:  # this stage's teacher weights, and the teacher weights its student stage starts from
        return teacher.holds(name) or (start_student and student_needs(name))

    _, state, sources = teacher_tp_shard(cfg, parallel_state.get_tensor_model_parallel_rank(), padded, keep=keep)
    load_tp_shard_state_dict(teacher, {n: v for n, v in state.items() if teacher.holds(n)})
    if start_student:
        needed = {n: v for n, v in state.items() if student_needs(n)}
        load_tp_shard_state_dict(student, every_kth_layer_state(needed, cfg.model.num_layers, d.k,
                                                                arch.layer_prefix))
        with torch.no_grad():  # both ends of a tied embedding got the teacher's: cheap insurance that they agree
            student._synchronize_tied_weights()
    del state
    student.attach_teacher(teacher, teacher_dtype)
    if d.aligns_layers:  # BERT (the config check refuses alignment for other students)
        student.stage_alignment = StageAlignment(cfg, student, teacher)
    student.loss_fn = loss_cls(student, cfg)
    student.metric_names = student.loss_fn.metric_names
    student.teacher_sources = sources
    return student

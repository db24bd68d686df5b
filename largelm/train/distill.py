"""Knowledge distillation: the run's model (student) learns from a frozen teacher checkpoint.

Per micro-batch: teacher logits (no grad, eval mode, ``distill.teacher_precision``), student logits (the DeepSpeed
engine's forward without labels: this TP rank's vocabulary partition [b, s, V/TP], megatron's
``parallel_output``), and

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, next tokens)

The KL is summed over the tokenizer's vocabulary (padded vocabulary entries are left out, so teacher and student
may pad differently) and averaged over tokens; the T^2 factor (Hinton et al.) keeps the KL gradient's scale
independent of T. Under tensor parallelism both logits stay split over the vocabulary: the KL is
``largelm.parallel.vocab_parallel_kl`` (TP all-reduces of the max, the sum of exponentials and the per-token KL)
and CE megatron's ``vocab_parallel_cross_entropy``; the full vocabulary is never gathered.

The teacher is built with the run's tensor parallelism (same TP group as the student, PP=1; a pipeline-parallel
student pipelines its teacher alongside: largelm/train/distill_pipeline.py) and each rank holds
only its TP shard of it, read from the teacher checkpoint's TP ranks that hold a part of it, whatever layout the
teacher was trained in (``teacher_tp_shard``); ``student_init: every_kth_layer`` starts the student's shard from
that teacher shard. See docs/design.md "Distillation".

``DistillLoss`` is that loss with its frozen teacher: ``build_step`` (largelm/train/step.py)
gives it to ``DenseStep`` when the config has a ``distill`` section, in place of the architecture's own forward
for training. So for the trainer the step behaves as without a teacher but for the loss: ``train_step`` returns the
mean total loss and leaves the two parts in ``last_metrics`` (``distill/kl``, ``distill/lm_loss``), which the
trainer logs; ``eval_loss`` stays the plain LM loss, so validation numbers compare with a run without a teacher.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from largelm.config import Config
from largelm.model.gpt import split_tokens
from largelm.model.registry import get_arch
from largelm.parallel import groups
from largelm.parallel.vocab_parallel_kl import vocab_parallel_kl
from largelm.train.distill_bert import BertDistillLoss
from largelm.train.teacher_model import build_teacher_shard


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                 temperature: float, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, kl, lm)``; logits: this TP rank's vocabulary partition [b, s, V/TP] of the padded vocabulary (the
    same padding for student and teacher; needs megatron's parallel_state), labels [b, s] (any token layout works,
    e.g. the pipeline's [s, b, V/TP] with [s, b] labels: both parts average over all tokens). Computed in fp32;
    every TP rank gets the same values."""
    s = student_logits.float()
    kl = vocab_parallel_kl(s / temperature, teacher_logits.float() / temperature, vocab_size).mean()
    # megatron's cross entropy works in place on its (fp32) input: give it its own copy of the caller's logits
    lm = vocab_parallel_cross_entropy(s.clone() if s is student_logits else s, labels).mean()
    kl = kl * temperature**2
    return alpha * kl + (1.0 - alpha) * lm, kl, lm


class DistillLoss:
    """The distillation training loss for ``DenseStep``: a frozen teacher (a GPTModel at the run's TP, PP=1: this
    rank's shard) and ``distill_loss`` against the student's logits. ``student_init``: with ``init_student``, this
    rank's TP shard of the student's starting weights this config asks for (``distill.student_init:
    every_kth_layer``), else None. ``teacher_sources``: the teacher checkpoint's TP ranks read for this rank's
    shard."""

    metric_prefix = "distill"  # last_metrics: distill/kl, distill/lm_loss

    def __init__(self, cfg: Config, init_student: bool = True):
        self.cfg = cfg
        self.teacher, self.student_init, self.teacher_sources = build_teacher_shard(cfg, init_student)
        self.device = groups.device()

    def __call__(self, student: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """``{"loss": total, "kl", "lm_loss"}`` of one ``tokens`` micro-batch; ``student`` is the DeepSpeed engine
        (its forward without labels gives this TP rank's vocabulary partition of the logits [b, s, V/TP])."""
        input_ids, labels, position_ids = split_tokens(batch["tokens"].to(self.device))
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids, position_ids, None)
        student_logits = student(input_ids, position_ids, None)
        total, kl, lm = distill_loss(student_logits, teacher_logits, labels, self.cfg.distill.alpha,
                                     self.cfg.distill.temperature, self.cfg.model.vocab_size)
        return {"loss": total, "kl": kl, "lm_loss": lm}


# ArchSpec.distill_objective -> the loss class that distils it (BERT's: largelm/train/distill_bert.py)
DISTILL_LOSSES = {"causal_lm": DistillLoss, "masked_lm": BertDistillLoss}


def build_distill_loss(cfg: Config, init_student: bool = True):
    """The distillation loss for the student's architecture (its ``ArchSpec.distill_objective``)."""
    return DISTILL_LOSSES[get_arch(cfg.model.arch).distill_objective](cfg, init_student=init_student)

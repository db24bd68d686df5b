"""Knowledge distillation: the run's model (student) learns from a frozen teacher checkpoint.

Per micro-batch: teacher logits (no grad, eval mode, ``distill.teacher_precision``), student logits (the DeepSpeed
engine's forward without labels: [b, s, V] at TP=1), and

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, next tokens)

The KL is summed over the tokenizer's vocabulary (padded vocabulary entries are left out, so teacher and student
may pad differently) and averaged over tokens; the T^2 factor (Hinton et al.) keeps the KL gradient's scale
independent of T. ``DistillLoss`` is that loss with its frozen teacher: ``build_step`` (largelm/train/step.py)
gives it to ``DenseStep`` when the config has a ``distill`` section, in place of the architecture's own forward
for training. So for the trainer the step behaves as without a teacher but for the loss: ``train_step`` returns the
mean total loss and leaves the two parts in ``last_metrics`` (``distill/kl``, ``distill/lm_loss``), which the
trainer logs; ``eval_loss`` stays the plain LM loss, so validation numbers compare with a run without a teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from largelm.config import Config
from largelm.hardware import run_precision
from largelm.model.gpt import split_tokens
from largelm.model.registry import get_arch
from largelm.model.weights import load_full_state_dict
from largelm.parallel import groups
from largelm.train.distill_bert import BertDistillLoss
from largelm.train.teacher import every_kth_layer_state, teacher_weights


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                 temperature: float, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, kl, lm)``; logits [b, s, V] (any padded V >= vocab_size), labels [b, s]. Computed in fp32."""
    s = student_logits.float()
    lm = F.cross_entropy(s.reshape(-1, s.size(-1)), labels.reshape(-1))
    t = teacher_logits.float()[..., :vocab_size] / temperature
    log_p_s = F.log_softmax(s[..., :vocab_size] / temperature, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * temperature**2
    return alpha * kl + (1.0 - alpha) * lm, kl, lm


class DistillLoss:
    """The distillation training loss for ``DenseStep``: a frozen teacher (a GPTModel, TP=1, PP=1) and
    ``distill_loss`` against the student's logits. ``student_init``: with ``init_student``, the student's starting
    weights this config asks for (``distill.student_init: every_kth_layer``), else None."""

    metric_prefix = "distill"  # last_metrics: distill/kl, distill/lm_loss

    def __init__(self, cfg: Config, init_student: bool = True):
        self.cfg = cfg
        d = cfg.distill
        teacher_cfg, teacher_state = teacher_weights(cfg)
        self.student_init = (every_kth_layer_state(teacher_state, cfg.model.num_layers, d.k)
                             if init_student and d.student_init == "every_kth_layer" else None)
        teacher_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[d.teacher_precision or run_precision(cfg)]
        arch = get_arch(teacher_cfg.model.arch)
        # No activation checkpointing: the teacher runs without grad (only the student, built by the step, gets it).
        self.teacher = arch.build_model(teacher_cfg.model, cfg.parallel, *arch.section_args(teacher_cfg),
                                        dtype=teacher_dtype)
        load_full_state_dict(self.teacher, teacher_state)
        self.teacher.eval().requires_grad_(False)
        self.device = groups.device()

    def __call__(self, student: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """``{"loss": total, "kl", "lm_loss"}`` of one ``tokens`` micro-batch; ``student`` is the DeepSpeed engine
        (its forward without labels gives the logits [b, s, V])."""
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

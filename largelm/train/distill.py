"""Knowledge distillation: the run's model (student) learns from a frozen teacher checkpoint.

Per micro-batch: teacher logits (no grad, eval mode, ``distill.teacher_precision``), student logits (the DeepSpeed
engine's forward without labels: [b, s, V] at TP=1), and

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, next tokens)

The KL is summed over the tokenizer's vocabulary (padded vocabulary entries are left out, so teacher and student
may pad differently) and averaged over tokens; the T^2 factor (Hinton et al.) keeps the KL gradient's scale
independent of T. ``DistillStep`` is chosen by ``build_step`` when the config has a ``distill`` section; it
behaves like ``DenseStep`` for the trainer (``train_step`` returns the mean total loss, ``eval_loss`` the plain
LM loss, so validation numbers compare with a run without a teacher) and exposes the two parts of the last step
in ``last_metrics`` (``distill/kl``, ``distill/lm_loss``), which the trainer logs.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from largelm.config import Config
from largelm.hardware import model_dtype, run_precision
from largelm.model.gpt import build_gpt_model, gpt_forward_loss, split_tokens
from largelm.model.specs import recompute_fields
from largelm.model.weights import load_full_state_dict
from largelm.parallel import groups
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


class DistillStep:
    """Student = a DeepSpeed-wrapped GPTModel (TP=1, PP=1, any ZeRO stage); teacher = a frozen GPTModel."""

    def __init__(self, cfg: Config, world_size: int, init_state_dict: Optional[dict] = None):
        from largelm.train.engine import initialize_engine

        self.cfg = cfg
        d = cfg.distill
        teacher_cfg, teacher_state = teacher_weights(cfg)
        if init_state_dict is None and d.student_init == "every_kth_layer":
            init_state_dict = every_kth_layer_state(teacher_state, cfg.model.num_layers, d.k)
        teacher_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[d.teacher_precision or run_precision(cfg)]
        self.teacher = build_gpt_model(teacher_cfg.model, cfg.parallel, vocab_size=teacher_cfg.model.vocab_size,
                                       dtype=teacher_dtype)
        load_full_state_dict(self.teacher, teacher_state)
        self.teacher.eval().requires_grad_(False)
        # Only the student trains (the teacher runs without grad): it alone gets train.activation_checkpointing.
        model = build_gpt_model(cfg.model, cfg.parallel, vocab_size=cfg.model.vocab_size, dtype=model_dtype(cfg),
                                **recompute_fields(cfg.train.activation_checkpointing))
        if init_state_dict is not None:
            load_full_state_dict(model, init_state_dict)
        self.engine = initialize_engine(cfg, model, world_size, mpu=groups.DeepSpeedMPU())
        self.device = groups.device()
        self.last_metrics: dict[str, float] = {}

    def micro_batch_loss(self, tokens: torch.Tensor):
        input_ids, labels, position_ids = split_tokens(tokens.to(self.device))
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids, position_ids, None)
        student_logits = self.engine(input_ids, position_ids, None)
        return distill_loss(student_logits, teacher_logits, labels, self.cfg.distill.alpha,
                            self.cfg.distill.temperature, self.cfg.model.vocab_size)

    def train_step(self, batches: Iterator[dict]) -> torch.Tensor:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns this rank's mean total loss."""
        self.engine.train()
        totals, kls, lms = [], [], []
        for _ in range(self.cfg.train.grad_accum_steps):
            total, kl, lm = self.micro_batch_loss(next(batches)["tokens"])
            self.engine.backward(total)
            self.engine.step()
            totals.append(total.detach())
            kls.append(kl.detach())
            lms.append(lm.detach())
        self.last_metrics = {"distill/kl": torch.stack(kls).mean().item(),
                             "distill/lm_loss": torch.stack(lms).mean().item()}
        return torch.stack(totals).mean()

    @torch.no_grad()
    def eval_loss(self, batch: dict) -> torch.Tensor:
        """The student's plain LM loss (comparable with a run without a teacher)."""
        self.engine.eval()
        return gpt_forward_loss(self.engine, batch["tokens"])[1]

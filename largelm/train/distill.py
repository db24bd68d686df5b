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

import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from largelm.config import Config, ConfigError
from largelm.fileio import sha256_file
from largelm.hardware import model_dtype, run_precision
from largelm.model.gpt import build_gpt_model, gpt_forward_loss, split_tokens
from largelm.model.specs import recompute_fields
from largelm.parallel import groups
from largelm.parallel.sharding import load_full_state_dict

_LAYER_PREFIX = "decoder.layers."


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


def _teacher_weights(cfg: Config):
    from largelm.checkpoint.full_weights import load_full_weights

    teacher_cfg, state, path = load_full_weights(cfg.distill.teacher)
    check_teacher(cfg, teacher_cfg, path)
    return teacher_cfg, state


def preflight_teacher(cfg: Config) -> None:
    """Before any process group: the teacher checkpoint resolves, has a config, and fits the student."""
    from largelm.checkpoint.full_weights import checkpoint_config, resolve_checkpoint
    from largelm.checkpoint.manager import CheckpointError

    try:
        path = resolve_checkpoint(cfg.distill.teacher)
        teacher_cfg = checkpoint_config(path)
    except CheckpointError as err:
        raise ConfigError(f"distill.teacher: {err}") from None
    check_teacher(cfg, teacher_cfg, path)


def check_teacher(cfg: Config, teacher_cfg: Config, path: Path) -> None:
    """The teacher must read the same token ids and cover the student's sequence length."""
    if teacher_cfg.model.arch != "gpt":
        raise ConfigError(f"distill.teacher: {path} is a model.arch={teacher_cfg.model.arch!r} checkpoint; "
                          "distillation supports GPT teachers")
    if teacher_cfg.parallel.tensor_parallel != 1 or teacher_cfg.parallel.pipeline_parallel != 1:
        raise ConfigError(f"distill.teacher: {path} was trained with tensor_parallel="
                          f"{teacher_cfg.parallel.tensor_parallel}, pipeline_parallel="
                          f"{teacher_cfg.parallel.pipeline_parallel}; teachers are read as TP=1/PP=1 checkpoints "
                          "(convert it to TP=1 first)")
    if teacher_cfg.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"distill.teacher: {path} has vocab_size {teacher_cfg.model.vocab_size}, the student "
                          f"{cfg.model.vocab_size}: teacher and student must share the tokenizer")
    _check_teacher_tokenizer(cfg, teacher_cfg, path)
    if teacher_cfg.model.positions < cfg.model.seq_length:
        raise ConfigError(f"distill.teacher: {path} handles {teacher_cfg.model.positions} positions, the student's "
                          f"model.seq_length is {cfg.model.seq_length}")
    if cfg.distill.student_init == "every_kth_layer":
        t, s, k = teacher_cfg.model, cfg.model, cfg.distill.k
        same = ("style", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                "tie_embeddings", "max_position_embeddings", "make_vocab_size_divisible_by")
        diff = [f"{f}: teacher {getattr(t, f)!r} vs student {getattr(s, f)!r}" for f in same
                if getattr(t, f) != getattr(s, f)]
        if diff:
            raise ConfigError("distill.student_init=every_kth_layer copies teacher layers, so the layer shape must "
                              "match the teacher's:\n  " + "\n  ".join(diff))
        if (s.num_layers - 1) * k >= t.num_layers:
            raise ConfigError(f"distill.student_init=every_kth_layer: student layer {s.num_layers - 1} would come "
                              f"from teacher layer {(s.num_layers - 1) * k}, but the teacher has {t.num_layers} "
                              f"layers (lower distill.k or model.num_layers)")


def _check_teacher_tokenizer(cfg: Config, teacher_cfg: Config, path: Path) -> None:
    """Equal vocabulary sizes do not make the same tokenizer (the KL would compare unrelated ids): compare the
    student's sentencepiece file (sha256) with the one the teacher's checkpoint manifest records, or else with the
    teacher's ``tokenizer.model`` file if it is still there; warn when neither is available."""
    from largelm.checkpoint.manager import MANIFEST, read_manifest

    teacher_tok, student_tok = Path(teacher_cfg.tokenizer.model), Path(cfg.tokenizer.model)
    if not student_tok.is_file():
        return  # preflight reports the student's missing tokenizer.model
    recorded = read_manifest(path).get("tokenizer_sha256") if (path / MANIFEST).is_file() else None
    if recorded:
        teacher_sha, teacher_desc = recorded, f"the tokenizer its manifest records ({teacher_tok} at the time)"
    elif teacher_tok.is_file():
        teacher_sha, teacher_desc = sha256_file(teacher_tok), f"tokenizer {teacher_tok}"
    else:
        warnings.warn(f"distill.teacher: {path} records no tokenizer hash and was trained with tokenizer.model="
                      f"{teacher_tok}, which is not there (from {Path.cwd()}): cannot verify that it is the "
                      f"student's tokenizer {student_tok}; only the vocabulary sizes were checked", stacklevel=2)
        return
    student_sha = sha256_file(student_tok)
    if teacher_sha != student_sha:
        raise ConfigError(f"distill.teacher: {path} was trained with {teacher_desc} (sha256 {teacher_sha[:12]}), "
                          f"the student's tokenizer.model is {student_tok} (sha256 {student_sha[:12]}): teacher "
                          "and student must share the tokenizer (same vocabulary size, different token ids)")


def every_kth_layer_state(teacher_state: dict[str, torch.Tensor], num_layers: int, k: int) -> dict:
    """Student weights: embeddings, final norm, output layer from the teacher; student layer i = teacher layer i*k."""
    out = {}
    for name, tensor in teacher_state.items():
        if not name.startswith(_LAYER_PREFIX):
            out[name] = tensor.clone()
            continue
        index, rest = name[len(_LAYER_PREFIX):].split(".", 1)
        index = int(index)
        if index % k == 0 and index // k < num_layers:
            out[f"{_LAYER_PREFIX}{index // k}.{rest}"] = tensor.clone()
    return out


class DistillStep:
    """Student = a DeepSpeed-wrapped GPTModel (TP=1, PP=1, any ZeRO stage); teacher = a frozen GPTModel."""

    def __init__(self, cfg: Config, world_size: int, init_state_dict: Optional[dict] = None):
        from largelm.train.engine import initialize_engine

        self.cfg = cfg
        d = cfg.distill
        teacher_cfg, teacher_state = _teacher_weights(cfg)
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

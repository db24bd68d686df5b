"""The distillation teacher as a module: this rank's tensor-parallel shard of it, built at the run's TP in the
same TP group as the student (GPT and BERT alike; largelm/train/distill.py, distill_bert.py)."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state

from largelm.config import Config, ModelConfig
from largelm.hardware import run_precision
from largelm.model.registry import get_arch
from largelm.model.weights import load_tp_shard_state_dict
from largelm.train.teacher import every_kth_layer_state, teacher_tp_shard


def teacher_build_settings(cfg: Config, teacher_cfg: Config) -> tuple[ModelConfig, torch.dtype]:
    """How the teacher is built beside the student (dense or pipelined): its model section with the student's
    ``make_vocab_size_divisible_by`` (so both pad the vocabulary alike and split their logits alike under TP), and
    its dtype (``distill.teacher_precision``, else the run's precision)."""
    teacher_model = teacher_cfg.model.model_copy(
        update={"make_vocab_size_divisible_by": cfg.model.make_vocab_size_divisible_by})
    precision = cfg.distill.teacher_precision or run_precision(cfg)
    return teacher_model, {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def build_teacher_shard(cfg: Config, init_student: bool) -> tuple[torch.nn.Module, Optional[dict], list[int]]:
    """``(teacher, student_init, sources)``: the frozen teacher (eval mode, no grad, ``distill.teacher_precision``,
    PP=1, this rank's TP shard), this rank's TP shard of the student's starting weights when ``init_student`` and
    ``distill.student_init: every_kth_layer`` (else None), and the teacher checkpoint's TP ranks read for it."""
    d = cfg.distill
    # the teacher pads its vocabulary as the student does, so both logits split the vocabulary alike
    padded = cfg.model.padded_vocab_size(parallel_state.get_tensor_model_parallel_world_size())
    # only the teacher checkpoint's TP ranks that hold a part of this rank's shard are read
    teacher_cfg, teacher_state, sources = teacher_tp_shard(cfg, parallel_state.get_tensor_model_parallel_rank(),
                                                           padded)
    arch = get_arch(cfg.model.arch)
    # the student is built at the same TP with the same padded vocabulary: its shard of teacher layer i*k is the
    # teacher's shard of that layer
    student_init = (every_kth_layer_state(teacher_state, cfg.model.num_layers, d.k, arch.layer_prefix)
                    if init_student and d.student_init == "every_kth_layer" else None)
    teacher_model, teacher_dtype = teacher_build_settings(cfg, teacher_cfg)
    # No activation checkpointing: the teacher runs without grad (only the student, built by the step, gets it).
    teacher = arch.build_model(teacher_model, cfg.parallel, *arch.section_args(teacher_cfg), dtype=teacher_dtype)
    load_tp_shard_state_dict(teacher, teacher_state)
    del teacher_state  # only the built shard stays
    return teacher.eval().requires_grad_(False), student_init, sources

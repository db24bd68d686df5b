"""A GPT or BERT pipeline stage that runs a frozen teacher's matching stage beside it (distillation with a
pipeline-parallel student; the loss is largelm/train/distill_pipeline.py's).

The teacher is a second pipeline module of the same architecture and topology (same TP, PP and DP; its own layers
split over the stages as the student's are), so every rank holds only its stage's TP shard of the teacher. It is
kept outside the student's module tree (``TeacherHolder``), so DeepSpeed's optimizer, ZeRO partitions, gradient
all-reduces and checkpoint files never see it; the engine's ``train()``/``eval()`` do not reach it either (it stays
in eval mode).

Per micro-batch, stage ``p`` runs the teacher's stage ``p`` (no grad) and the student's stage ``p``, and hands
the student's activation with the teacher's appended to the next stage; the first stage's inputs feed both
embeddings, the last stage returns both logits ([s, b, V/TP] each) to the loss (per architecture:
``DistillGPTPipelineModule``, ``DistillBertPipelineModule``).

**Why the teacher's activation crosses as an integer view.** DeepSpeed's PipelineEngine (0.19.8, runtime/pipe/
engine.py) treats every floating-point tensor of an activation tuple as one that carries a gradient: the receiver
sets ``requires_grad`` on it, the backward pass wants a gradient for each floating-point output, and the gradient
send/receive buffers are sized from them; integer tensors are passed along without gradients (how it carries
attention masks). The teacher's hidden state has no gradient, so it is sent as an integer view of the same bits (no
copy) and viewed back on receipt (``to_wire``/``from_wire``, the only place this happens): ``int32`` for fp32;
``uint8`` for bf16/fp16 (the last dimension doubles), since NCCL has no 16-bit integer type (torch's
``ncclDataType`` map: int8, uint8, int32, int64 and the float types). With tensor parallelism DeepSpeed sends the
student's activation partitioned over the TP group (``pipe_partitioned``); the teacher's tail element is sent whole.

Both tuples have the same structure in training and evaluation (DeepSpeed sends the tensor metadata once, at the
first send), so the teacher also runs during evaluation, where the loss ignores it.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from largelm.model.bert_pipeline import BertPipelineModule
from largelm.model.pipeline import GPTPipelineModule

# the integer type (one NCCL and gloo both send) whose view carries a teacher activation of each dtype between stages
_WIRE_DTYPES = {torch.float32: torch.int32, torch.bfloat16: torch.uint8, torch.float16: torch.uint8}


def to_wire(hidden: torch.Tensor) -> torch.Tensor:
    """The teacher's activation as the integer bit view DeepSpeed passes along without a gradient (uint8 views of
    16-bit floats have twice the last dimension)."""
    return hidden.contiguous().view(_WIRE_DTYPES[hidden.dtype])


def from_wire(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``to_wire`` undone: the same bits as ``dtype``."""
    if bits.dtype != _WIRE_DTYPES[dtype]:
        raise TypeError(f"teacher activation arrived as {bits.dtype}, expected the {dtype} view "
                        f"{_WIRE_DTYPES[dtype]}")
    return bits.view(dtype)


class TeacherHolder:
    """Holds the teacher's stage outside the student's module tree (a plain object: ``nn.Module`` does not register
    its attributes as submodules or parameters)."""

    def __init__(self, module: GPTPipelineModule, dtype: torch.dtype):
        self.module = module.eval().requires_grad_(False)
        self.dtype = dtype


class DistillStage:
    """The teacher-beside-student forward of a pipeline stage, mixed into an architecture's pipeline module (which
    supplies the student's own ``forward``); ``attach_teacher`` before the first forward. What crosses the stages is
    the architecture's: ``_wire_split``/``_wire_join`` (between stages), ``_last_outputs`` (to the loss)."""

    teacher: Optional[TeacherHolder] = None

    def attach_teacher(self, teacher: GPTPipelineModule, dtype: torch.dtype) -> None:
        if (teacher._local_start == 0) != self.is_first_stage or teacher.num_stages != self.num_stages:
            raise ValueError("the teacher's pipeline stages must be the student's (same pipeline_parallel)")
        self.teacher = TeacherHolder(teacher, dtype)

    @property
    def is_first_stage(self) -> bool:
        return self._local_start == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    def model_forward(self, inputs):
        """The student's stage alone (the architecture module's forward, no teacher): what runs the student outside
        the training schedule (in-training lm-eval, ``largelm.model.parallel_forward``)."""
        return super().forward(inputs)

    def forward(self, inputs):
        if self.teacher is None:
            raise RuntimeError(f"{type(self).__name__}: no teacher attached (attach_teacher)")
        if self.is_first_stage:
            student_in = teacher_in = inputs  # the first stage's inputs feed both embeddings
        else:
            student_in, teacher_in = self._wire_split(inputs)
        student_out, teacher_out = self._run_stages(student_in, teacher_in)
        if self.is_last_stage:
            return self._last_outputs(student_out, teacher_out)
        return self._wire_join(student_out, teacher_out)

    def _run_stages(self, student_in, teacher_in):
        """The teacher's stage (no grad), then the student's: their outputs."""
        with torch.no_grad():
            teacher_out = self.teacher.module(teacher_in)
        return super().forward(student_in), teacher_out


class DistillGPTPipelineModule(DistillStage, GPTPipelineModule):
    """The GPT student's stage: ``(student_hidden, teacher_bits)`` between stages (the first takes
    ``(input_ids,)``), ``(student_logits, teacher_logits)`` to ``PipelineDistillLoss``."""

    def _wire_split(self, inputs):
        student_hidden, bits = inputs
        return student_hidden, from_wire(bits, self.teacher.dtype)

    def _wire_join(self, student_out, teacher_out):
        return student_out, to_wire(teacher_out)

    def _last_outputs(self, student_out, teacher_out):
        return student_out, teacher_out


class DistillBertPipelineModule(DistillStage, BertPipelineModule):
    """The BERT student's stage: the first takes ``(input_ids, attention_mask, token_type_ids)`` (both embeddings
    read them), ``(student_hidden, attention_mask, teacher_bits)`` cross the stages (BERT's own ``(hidden,
    attention_mask)`` with the teacher's hidden appended; the integer padding mask serves both encoders), and the
    last stage hands ``(student_logits, student_binary_logits, teacher_logits)`` ([s, b, V/TP]; the binary logits
    [b, 2] or None) to ``BertPipelineDistillLoss``."""

    # Layer alignment on this stage (hidden states, attention maps; set by largelm/train/distill_pipeline.py, None
    # without): ``captured(student_stage, teacher_stage)`` hooks the stage's aligned layers for the forwards run
    # inside, ``loss(captured, attention_mask)`` is the stage's part of the alignment loss, scaled for the backward.
    stage_alignment = None

    def _run_stages(self, student_in, teacher_in):
        if self.stage_alignment is None or not self.training:
            return super()._run_stages(student_in, teacher_in)
        with self.stage_alignment.captured(self, self.teacher.module) as captured:
            student_out, teacher_out = super()._run_stages(student_in, teacher_in)
        aux = self.stage_alignment.loss(captured, student_in[1])  # the padding mask: the stage's input either way
        # The loss only the last stage sees: this stage's alignment part enters the backward through the stage's
        # output (megatron's MoE aux-loss trick: identity forward; backward adds d aux to the output's gradient
        # path, aux's own gradient being megatron's main_loss_backward_scale, left at its default 1 - only megatron's
        # MoE schedules set it, and MoE students are not distilled -; the 1/grad_accum scale is already in aux).
        return (MoEAuxLossAutoScaler.apply(student_out[0], aux), *student_out[1:]), teacher_out

    def _wire_split(self, inputs):
        student_hidden, attention_mask, bits = inputs
        return (student_hidden, attention_mask), (from_wire(bits, self.teacher.dtype), attention_mask)

    def _wire_join(self, student_out, teacher_out):
        student_hidden, attention_mask = student_out
        return student_hidden, attention_mask, to_wire(teacher_out[0])

    def _last_outputs(self, student_out, teacher_out):
        student_logits, student_binary = student_out
        return student_logits, student_binary, teacher_out[0]

"""BERT layer alignment (hidden states, attention maps) with a pipeline-parallel student (``parallel.pipeline_parallel
> 1``; largelm/train/distill_pipeline.py builds it, ``DistillBertPipelineModule`` runs it).

Each (student layer, teacher layer) pair of ``distill.layer_map`` must sit on one pipeline stage (checked with the
teacher's config, largelm/train/teacher.py): with ``every_kth_layer`` and layer counts divisible by PP this always
holds. The stage holding a pair computes its part of the alignment loss there, with the dense path's functions
(``hidden_alignment``, ``attention_alignment`` on the stage's layers, hooked by ``captured_modules``): the mean over
the stage's pairs times their share of all pairs, so the parts of all stages sum to the dense path's mean over
pairs. Only the last stage computes the loss DeepSpeed backpropagates, so the stage's part enters the backward
through the stage's output (``MoEAuxLossAutoScaler``, megatron's MoE aux-loss trick), divided by
``grad_accum_steps`` as DeepSpeed divides the last stage's loss. The values are kept per micro-batch (``records``);
``PipelineStep`` sums the stages' means over the pipeline and adds them, weighted, to the reported loss
(``distill/hidden``, ``distill/attention``: the dense path's names). No ``hidden_projection`` at PP > 1 (refused:
one projection would serve layers on several stages).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from megatron.core import parallel_state

from largelm.config import Config, ConfigError
from largelm.train.distill_bert import attention_alignment, captured_modules, hidden_alignment
from largelm.train.teacher import aligned_layers


class StageAlignment:
    """This stage's part of the layer alignment (module docstring). ``names``/``weights``: the parts and their loss
    weights, for the step driver."""

    def __init__(self, cfg: Config, student_stage: torch.nn.Module, teacher_stage: torch.nn.Module):
        d = cfg.distill
        pairs = aligned_layers(cfg)
        self.share = 1.0 / len(pairs)
        self.local = [(s, t) for s, t in pairs if student_stage.stage_layer(s + 1) is not None]
        for s, t in self.local:
            if teacher_stage.stage_layer(t + 1) is None:  # the config check with the teacher's config refuses this
                raise ConfigError(f"distill.layer_map: student layer {s} and teacher layer {t} sit on different "
                                  "pipeline stages")
        self.weights = {name: w for name, w in (("hidden", d.hidden_weight), ("attention", d.attention_weight))
                        if w > 0}
        self.names = list(self.weights)
        self.hidden_loss, self.grad_accum = d.hidden_loss, cfg.train.grad_accum_steps
        self.sequence_parallel = cfg.parallel.sequence_parallel
        self.tensor_parallel = parallel_state.get_tensor_model_parallel_world_size()
        self.records: list[dict[str, torch.Tensor]] = []

    @contextmanager
    def captured(self, student_stage, teacher_stage) -> Iterator[tuple]:
        """(student outputs, student maps, teacher outputs, teacher maps) of this stage's aligned layers, for the
        forwards run inside."""
        hidden, attention = "hidden" in self.weights, "attention" in self.weights
        with ExitStack() as stack:
            student = stack.enter_context(captured_modules(
                {s: student_stage.stage_layer(s + 1).layer for s, _ in self.local}, hidden, attention))
            teacher = stack.enter_context(captured_modules(
                {t: teacher_stage.stage_layer(t + 1).layer for _, t in self.local}, hidden, attention))
            yield (*student, *teacher)

    def loss(self, captured: tuple, attention_mask: torch.Tensor) -> torch.Tensor:
        """This stage's weighted alignment loss of one micro-batch, divided by ``grad_accum_steps`` (what the
        backward needs); records the unweighted parts."""
        s_hidden, s_maps, t_hidden, t_maps = captured
        parts = {name: torch.zeros((), dtype=torch.float32, device=attention_mask.device) for name in self.names}
        if self.local:
            share = self.share * len(self.local)  # the dense value is the mean over all pairs
            students, teachers = [s for s, _ in self.local], [t for _, t in self.local]
            if "hidden" in parts:
                parts["hidden"] = share * hidden_alignment([s_hidden[i] for i in students],
                                                           [t_hidden[i] for i in teachers], attention_mask,
                                                           self.hidden_loss, None, self.sequence_parallel)
            if "attention" in parts:
                parts["attention"] = share * attention_alignment([s_maps[i] for i in students],
                                                                 [t_maps[i] for i in teachers], attention_mask,
                                                                 self.tensor_parallel)
        self.records.append({name: value.detach() for name, value in parts.items()})
        return sum(self.weights[name] * value for name, value in parts.items()) / self.grad_accum

    def step_means(self) -> torch.Tensor:
        """This stage's parts averaged over the micro-batches recorded since the last call (``names`` order)."""
        means = torch.stack([torch.stack([r[name] for r in self.records]).mean() for name in self.names])
        self.records = []
        return means

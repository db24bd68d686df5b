"""The ``distill:`` section (knowledge distillation, largelm/train/distill.py and distill_bert.py) and its checks
against the student's model section."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DistillConfig(BaseModel):
    """Knowledge distillation (largelm.train.distill; BERT: largelm.train.distill_bert): the run's model is the
    student, trained on ``alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * hard loss`` (GPT: the
    LM loss; BERT: KL on the masked positions, hard = MLM (+ SOP/NSP) loss, plus ``hidden_weight`` x hidden-state
    and ``attention_weight`` x attention-map alignment over ``layer_map``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)  # as every section (schema._Section)

    teacher: str = Field(description="teacher checkpoint: a checkpoint root (its latest) or one step_XXXXXXXX dir")
    alpha: float = Field(default=0.5, ge=0, le=1, description="weight of the KL term")
    temperature: float = Field(default=2.0, gt=0)
    student_init: Literal["random", "every_kth_layer"] = "random"
    k: int = Field(default=2, ge=1, description="every_kth_layer: student layer i starts from teacher layer i*k")
    # None: the run's train.precision. The teacher is frozen and in eval mode either way.
    teacher_precision: Optional[Literal["fp32", "bf16"]] = None
    # BERT (largelm.train.distill_bert): alignment of intermediate layers, added to the loss with these weights.
    hidden_weight: float = Field(default=0.0, ge=0, description="weight of the hidden-state alignment (BERT)")
    hidden_loss: Literal["cosine", "mse", "cosine+mse"] = Field(
        default="cosine", description="hidden-state alignment: 1 - cosine similarity, MSE, or their sum")
    # TinyBERT's W_h: hidden-state alignment through a learned projection of the student's states to the teacher's
    # hidden size (needed when they differ; trained with the student, in its checkpoints, not in its export)
    hidden_projection: bool = Field(default=False, description="hidden-state alignment through a learned "
                                    "linear projection student hidden -> teacher hidden (BERT, TinyBERT's W_h)")
    attention_weight: float = Field(default=0.0, ge=0, description="weight of the attention-map alignment (BERT): "
                                    "squared differences of the attention probabilities")
    # Which layers are aligned: (student layer, teacher layer) pairs of 0-based layer *outputs*. every_kth_layer:
    # student layer i <-> teacher layer (i + 1) * k - 1 (the last student layer meets teacher layer S*k - 1).
    layer_map: Union[Literal["every_kth_layer"], list[tuple[int, int]]] = "every_kth_layer"

    @model_validator(mode="after")
    def _check_layer_map(self) -> "DistillConfig":
        if isinstance(self.layer_map, list):
            if not self.layer_map:
                raise ValueError("distill.layer_map: an explicit map needs at least one [student, teacher] pair")
            bad = [pair for pair in self.layer_map if min(pair) < 0]
            if bad:
                raise ValueError(f"distill.layer_map: layer indices are 0-based and non-negative, got {bad[0]}")
            students = [s for s, _ in self.layer_map]
            if len(set(students)) != len(students):
                raise ValueError("distill.layer_map: a student layer appears twice")
        if self.hidden_projection and self.hidden_weight == 0:
            raise ValueError("distill.hidden_projection: the projection is trained by the hidden-state alignment; "
                             "set distill.hidden_weight > 0 (or hidden_projection false)")
        return self

    @property
    def aligns_layers(self) -> bool:
        """Hidden-state or attention alignment is on (BERT only)."""
        return self.hidden_weight > 0 or self.attention_weight > 0


def check_distill_layout(model, parallel, d: Optional[DistillConfig] = None) -> None:
    """Which students distillation supports: GPT and BERT at any tensor parallelism (with or without sequence
    parallelism), data parallelism and ZeRO stage (the teacher is built with the run's TP); both also at pipeline
    parallelism (the teacher is pipelined alongside at the same PP, its layers split over the stages; no virtual
    pipeline; the pipeline path's ZeRO 0/1; BERT's layer alignment without ``hidden_projection``, each aligned pair on
    one stage: checked with the teacher, largelm/train/teacher.py) (docs/design.md "Distillation")."""
    if model.arch not in ("gpt", "bert"):
        raise ValueError(f"distill: distillation supports model.arch='gpt' or 'bert' (got arch={model.arch!r})")
    if parallel.pipeline_parallel > 1 and d is not None and d.hidden_projection:
        raise ValueError(
            f"distill.hidden_projection: the learned projection is not supported at parallel.pipeline_parallel="
            f"{parallel.pipeline_parallel} (one projection would serve aligned layers on several stages); align "
            "equal hidden sizes without it, or distill at pipeline_parallel 1")
    if parallel.pipeline_parallel > 1 and parallel.virtual_pipeline is not None:
        raise ValueError(f"distill: parallel.virtual_pipeline={parallel.virtual_pipeline} is not supported with "
                         "distillation (the teacher is pipelined stage by stage with the student); leave it unset")


def check_distill_alignment(d: DistillConfig, model, activation_checkpointing: str) -> None:
    """Layer alignment (hidden states, attention maps) against the student: BERT only, its layer outputs kept (no
    activation checkpointing), explicit ``layer_map`` entries naming student layers that exist. ``model``: the
    ``ModelConfig``. The teacher's side is checked with its checkpoint (largelm.train.teacher.check_teacher)."""
    if not d.aligns_layers:
        return
    field = "distill.hidden_weight" if d.hidden_weight > 0 else "distill.attention_weight"
    if model.arch != "bert":
        raise ValueError(f"{field}: layer alignment (hidden states, attention maps) is implemented for "
                         f"model.arch='bert' students, the model is {model.arch!r}; set it to 0")
    if activation_checkpointing != "none":
        raise ValueError(f"{field}: layer alignment reads the student's layer outputs and attention maps, which "
                         f"train.activation_checkpointing={activation_checkpointing!r} recomputes without keeping "
                         "them; use activation_checkpointing 'none'")
    if isinstance(d.layer_map, list):
        beyond = [s for s, _ in d.layer_map if s >= model.num_layers]
        if beyond:
            raise ValueError(f"distill.layer_map: student layer {beyond[0]} does not exist (model.num_layers="
                             f"{model.num_layers}; layers are 0-based)")

"""BERT knowledge distillation (DistilBERT / TinyBERT style): a BERT student learns from a frozen BERT teacher on
the masked-LM (+ SOP/NSP) batches of its own training data.

Per micro-batch (``input_ids``, ``token_type_ids``, ``attention_mask``, ``mlm_labels`` with -100 on unmasked
positions, ``pair_label``; masked by the loader as without a teacher), the teacher and the student run on the same
inputs and

    loss = alpha * T^2 * KL_masked + (1 - alpha) * (MLM loss + pair loss)
           + hidden_weight * hidden + attention_weight * attention

* ``KL_masked``: KL(softmax(t / T) || softmax(s / T)) over the tokenizer's vocabulary (padded entries left out),
  averaged over the *masked* positions only (the positions the MLM objective predicts);
* MLM and pair loss: the architecture's own (``bert_metrics_from_logits``: the same numbers a run without a teacher
  reports; the pair loss only with ``bert.binary_head``);
* ``hidden``: over the (student layer, teacher layer) pairs of ``distill.layer_map`` (0-based layer outputs,
  ``largelm.train.teacher.aligned_layers``), the mean over pairs of: 1 - cosine similarity of the two layer outputs,
  averaged over the non-padded tokens (``cosine``), and/or their squared difference averaged over non-padded tokens
  and the hidden dimension (``mse``); with ``distill.hidden_projection`` the student's states first pass through a
  learned ``W_h`` (TinyBERT: student hidden -> teacher hidden; ``attach_hidden_projection``), which makes
  different hidden sizes possible;
* ``attention``: over the same pairs, the squared difference of the attention probabilities [b, heads, q, k]
  summed over the non-padded keys of a row, averaged over heads and non-padded queries, then over pairs (a sum
  per row keeps its scale independent of the sequence length: each row is a distribution).

Layer outputs and attention maps are read with forward hooks for the one forward (on each ``TransformerLayer`` and
on its ``core_attention.attention_dropout``, whose input is megatron's softmax output), removed right after. The
metrics are ``distill/kl``, ``distill/mlm_loss``, ``distill/mlm_acc``, ``distill/<sop|nsp>_loss``/``_acc``,
``distill/hidden``, ``distill/attention``; ``eval_loss`` stays the plain BERT loss (largelm/train/step.py).

Tensor parallelism (as GPT distillation, largelm/train/distill.py): the teacher is built at the run's TP in the
same TP group, each rank holding its shard read per TP rank (``build_teacher_shard``); the MLM logits of both stay
split over the vocabulary (megatron's ``parallel_output``): the KL is ``vocab_parallel_kl``, the MLM loss
megatron's vocab-parallel cross entropy. Hidden states are whole on every TP rank, or under sequence parallelism
this rank's chunk of the sequence, whose sums are reduced over the TP group; attention maps hold this rank's heads,
whose sum is reduced over the TP group (backward: identity, megatron's ``reduce_from_tensor_model_parallel_region``).
Every TP rank gets the same loss values.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

from largelm.config import Config
from largelm.model.bert import IGNORE_INDEX, bert_metrics_from_logits
from largelm.model.layout import DISTILL_PROJECTION
from largelm.parallel import groups
from largelm.parallel.sequence_parallel import reduce_sequence_parallel_grads_in_backward
from largelm.parallel.vocab_parallel_kl import vocab_parallel_kl
from largelm.train.teacher import aligned_layers
from largelm.train.teacher_model import build_teacher_shard

_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "pair_label")


def masked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
              vocab_size: int) -> torch.Tensor:
    """T^2 * KL(teacher || student at T) summed over the first ``vocab_size`` entries, averaged over the masked
    positions (``labels != -100``). Logits [b, s, V/tp]: this TP rank's partition of the padded vocabulary (both
    alike; megatron's ``parallel_output``), never gathered (``vocab_parallel_kl``: needs megatron's parallel_state);
    fp32. Every TP rank gets the same value."""
    masked = (labels != IGNORE_INDEX).float()
    per_position = vocab_parallel_kl(student_logits.float() / temperature, teacher_logits.float() / temperature,
                                     vocab_size)
    return (per_position * masked).sum() / masked.sum().clamp(min=1.0) * temperature**2


def logit_distill_loss(student_logits: torch.Tensor, student_binary: Optional[torch.Tensor],
                       teacher_logits: torch.Tensor, mlm_labels: torch.Tensor, pair_label: Optional[torch.Tensor],
                       cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``alpha * T^2 * KL_masked + (1 - alpha) * (MLM + pair loss)`` and the detached metrics (``kl``,
    ``mlm_loss``, ``mlm_acc``, ``<sop|nsp>_loss``/``_acc``): the logit part of the loss, without the layer
    alignment. Logits [b, s, V/tp] (this TP rank's vocabulary partition), binary logits [b, 2] or None; shared by
    ``BertDistillLoss`` and the pipeline's last stage (largelm/train/distill_pipeline.py)."""
    d = cfg.distill
    # The KL first: megatron's vocab-parallel cross entropy (in bert_metrics_from_logits) works in place on the
    # fp32 logits it is given.
    kl = masked_kl(student_logits, teacher_logits, mlm_labels, d.temperature, cfg.model.vocab_size)
    pair: Optional[torch.Tensor] = pair_label if student_binary is not None else None
    hard = bert_metrics_from_logits(student_logits, student_binary, mlm_labels, pair, cfg.bert.objective)
    total = d.alpha * kl + (1.0 - d.alpha) * hard.pop("loss")
    return total, {"kl": kl.detach(), **hard}


def _tp_sum(local: torch.Tensor, tensor_parallel: bool) -> torch.Tensor:
    """Sum of a per-rank partial loss over the TP group; backward identity (megatron's
    ``reduce_from_tensor_model_parallel_region``): each rank's part gets the gradient of the sum."""
    return reduce_from_tensor_model_parallel_region(local) if tensor_parallel else local


def hidden_alignment(student: list[torch.Tensor], teacher: list[torch.Tensor], attention_mask: torch.Tensor,
                     kind: str, projection: Optional[torch.nn.Module] = None,
                     sequence_parallel: bool = False) -> torch.Tensor:
    """Mean over layer pairs of the hidden-state loss (``cosine``, ``mse`` or ``cosine+mse``; module docstring).
    Hidden states [s, b, h] (megatron's layout), ``attention_mask`` [b, s] with 1 on real tokens. ``projection``:
    applied to the student's states first (TinyBERT's W_h). ``sequence_parallel``: the states are this TP rank's
    contiguous chunk of the sequence [s/tp, b, h] (megatron's split); the sums are reduced over the TP group."""
    valid = attention_mask.t().float()  # [s, b]
    count = valid.sum().clamp(min=1.0)
    if sequence_parallel:
        valid = valid.chunk(parallel_state.get_tensor_model_parallel_world_size())[
            parallel_state.get_tensor_model_parallel_rank()]
    total = torch.zeros((), dtype=torch.float32, device=valid.device)
    for hs, ht in zip(student, teacher):
        hs, ht = (projection(hs) if projection is not None else hs).float(), ht.float()
        if "cosine" in kind:
            total = total + ((1.0 - F.cosine_similarity(hs, ht, dim=-1)) * valid).sum()
        if "mse" in kind:
            total = total + (((hs - ht) ** 2).mean(-1) * valid).sum()
    return _tp_sum(total, sequence_parallel) / count / len(student)


def attention_alignment(student: list[torch.Tensor], teacher: list[torch.Tensor],
                        attention_mask: torch.Tensor, tensor_parallel: int = 1) -> torch.Tensor:
    """Mean over layer pairs of the attention-map loss (module docstring). Maps [b, heads/tp, q, k]: this TP rank's
    heads (``tensor_parallel`` ranks split them); the sum over heads is reduced over the TP group."""
    valid = attention_mask.float()
    pairs = valid[:, None, :, None] * valid[:, None, None, :]  # [b, 1, q, k]: both ends real tokens
    count = (valid.sum() * student[0].size(1) * tensor_parallel).clamp(min=1.0)  # real query tokens x all heads
    total = torch.zeros((), dtype=torch.float32, device=valid.device)
    for ps, pt in zip(student, teacher):
        total = total + (((ps.float() - pt.float()) ** 2) * pairs).sum()
    return _tp_sum(total, tensor_parallel > 1) / count / len(student)


@contextmanager
def captured_layers(model: torch.nn.Module, layers: list[int], hidden: bool,
                    attention: bool) -> Iterator[tuple[dict, dict]]:
    """({layer: output [s, b, h]}, {layer: attention probabilities [b, heads, q, k]}) of the forwards run inside.

    ``model``: a ``BertModel`` or a wrapper of one (a DeepSpeed engine: its ``.module``)."""
    bert = getattr(model, "module", model)
    with captured_modules({index: bert.encoder.layers[index] for index in layers}, hidden, attention) as captured:
        yield captured


@contextmanager
def captured_modules(layers: dict[int, torch.nn.Module], hidden: bool,
                     attention: bool) -> Iterator[tuple[dict, dict]]:
    """``captured_layers`` for given megatron ``TransformerLayer`` modules ({layer index: module}; a pipeline
    stage's layers, largelm/train/distill_pipeline_align.py)."""
    outputs: dict[int, torch.Tensor] = {}
    maps: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in layers.items():
        if hidden:
            handles.append(layer.register_forward_hook(
                lambda _m, _i, out, index=index: outputs.__setitem__(index, out[0] if isinstance(out, tuple)
                                                                      else out)))
        if attention:
            handles.append(layer.self_attention.core_attention.attention_dropout.register_forward_hook(
                lambda _m, inputs, _o, index=index: maps.__setitem__(index, inputs[0])))
    try:
        yield outputs, maps
    finally:
        for handle in handles:
            handle.remove()


def attach_hidden_projection(model: torch.nn.Module, cfg: Config, teacher_hidden: int) -> torch.nn.Linear:
    """TinyBERT's W_h: a learned ``Linear(student hidden -> teacher hidden, no bias)`` registered on the student
    ``model`` as ``distill_projection`` (``DISTILL_PROJECTION``), so the optimizer, ZeRO partitioning and the
    checkpoint (exact resume) treat it as any student parameter; the checkpoint readers (export, teacher reads)
    drop it. Replicated over the TP group: the same seeded start on every rank (``train.seed``); its inputs are
    the same on every TP rank (so are its gradients), except under sequence parallelism, where each rank sees its
    chunk of the sequence and the gradients are all-reduced over the TP group (marked ``sequence_parallel``, as
    megatron's norms)."""
    hidden = cfg.model.hidden_size
    generator = torch.Generator().manual_seed(cfg.train.seed)
    projection = torch.nn.Linear(hidden, teacher_hidden, bias=False)
    with torch.no_grad():  # std 1/sqrt(fan in): unit-scale inputs give unit-scale outputs
        projection.weight.copy_(torch.randn(teacher_hidden, hidden, generator=generator) / math.sqrt(hidden))
    projection.to(device=groups.device(), dtype=next(model.parameters()).dtype)
    if cfg.parallel.sequence_parallel:
        projection.weight.sequence_parallel = True
        reduce_sequence_parallel_grads_in_backward(projection)
    model.add_module(DISTILL_PROJECTION, projection)
    return projection


class BertDistillLoss:
    """The BERT distillation training loss for ``DenseStep`` (see the module docstring): a frozen teacher at the
    run's TP (this rank's shard, ``build_teacher_shard``); ``student_init`` and ``teacher_sources`` as in
    ``largelm.train.distill.DistillLoss``. With ``distill.hidden_projection``, ``extend_student`` gives the student
    its projection before the DeepSpeed engine is built."""

    metric_prefix = "distill"

    def __init__(self, cfg: Config, init_student: bool = True):
        self.cfg = cfg
        d = cfg.distill
        self.teacher, self.student_init, self.teacher_sources = build_teacher_shard(cfg, init_student)
        self.layer_pairs = aligned_layers(cfg) if d.aligns_layers else []
        self.tensor_parallel = parallel_state.get_tensor_model_parallel_world_size()
        self.device = groups.device()

    def extend_student(self, model: torch.nn.Module) -> None:
        """Called by ``DenseStep`` on the built student (weights loaded, before DeepSpeed wraps it)."""
        if self.cfg.distill.hidden_projection and self.cfg.distill.hidden_weight > 0:
            attach_hidden_projection(model, self.cfg, self.teacher.config.hidden_size)

    def _run(self, model: torch.nn.Module, batch: dict, layers: list[int]):
        d = self.cfg.distill
        with captured_layers(model, layers, d.hidden_weight > 0, d.attention_weight > 0) as (hidden, maps):
            logits, binary_logits = model(batch["input_ids"], batch["attention_mask"],
                                          tokentype_ids=batch["token_type_ids"])
        return logits, binary_logits, [hidden[i] for i in layers if hidden], [maps[i] for i in layers if maps]

    def __call__(self, student: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        d = self.cfg.distill
        batch = {k: batch[k].to(self.device) for k in _INPUTS if k in batch}
        with torch.no_grad():
            t_logits, _, t_hidden, t_maps = self._run(self.teacher, batch, [t for _, t in self.layer_pairs])
        s_logits, s_binary, s_hidden, s_maps = self._run(student, batch, [s for s, _ in self.layer_pairs])
        total, out = logit_distill_loss(s_logits, s_binary, t_logits, batch["mlm_labels"], batch.get("pair_label"),
                                        self.cfg)
        if d.hidden_weight > 0:
            projection = getattr(getattr(student, "module", student), DISTILL_PROJECTION, None)
            hidden = hidden_alignment(s_hidden, t_hidden, batch["attention_mask"], d.hidden_loss, projection,
                                      self.cfg.parallel.sequence_parallel)
            total = total + d.hidden_weight * hidden
            out["hidden"] = hidden.detach()
        if d.attention_weight > 0:
            attention = attention_alignment(s_maps, t_maps, batch["attention_mask"], self.tensor_parallel)
            total = total + d.attention_weight * attention
            out["attention"] = attention.detach()
        return {"loss": total, **out}

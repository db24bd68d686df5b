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
  and the hidden dimension (``mse``);
* ``attention``: over the same pairs, the squared difference of the attention probabilities [b, heads, q, k]
  summed over the non-padded keys of a row, averaged over heads and non-padded queries, then over pairs (a sum
  per row keeps its scale independent of the sequence length: each row is a distribution).

Layer outputs and attention maps are read with forward hooks for the one forward (on each ``TransformerLayer`` and
on its ``core_attention.attention_dropout``, whose input is megatron's softmax output), removed right after. The
metrics are ``distill/kl``, ``distill/mlm_loss``, ``distill/mlm_acc``, ``distill/<sop|nsp>_loss``/``_acc``,
``distill/hidden``, ``distill/attention``; ``eval_loss`` stays the plain BERT loss (largelm/train/step.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from largelm.config import Config
from largelm.hardware import run_precision
from largelm.model.bert import IGNORE_INDEX, bert_metrics_from_logits
from largelm.model.registry import get_arch
from largelm.model.weights import load_full_state_dict
from largelm.parallel import groups
from largelm.train.teacher import aligned_layers, every_kth_layer_state, teacher_weights

_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "pair_label")


def masked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
              vocab_size: int) -> torch.Tensor:
    """T^2 * KL(teacher || student at T) summed over the first ``vocab_size`` entries, averaged over the masked
    positions (``labels != -100``). Logits [b, s, V] (any padded V >= vocab_size), fp32."""
    masked = (labels != IGNORE_INDEX).float()
    log_p_s = F.log_softmax(student_logits.float()[..., :vocab_size] / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float()[..., :vocab_size] / temperature, dim=-1)
    per_position = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return (per_position * masked).sum() / masked.sum().clamp(min=1.0) * temperature**2


def hidden_alignment(student: list[torch.Tensor], teacher: list[torch.Tensor], attention_mask: torch.Tensor,
                     kind: str) -> torch.Tensor:
    """Mean over layer pairs of the hidden-state loss (``cosine``, ``mse`` or ``cosine+mse``; module docstring).
    Hidden states [s, b, h] (megatron's layout), ``attention_mask`` [b, s] with 1 on real tokens."""
    valid = attention_mask.t().float()  # [s, b]
    count = valid.sum().clamp(min=1.0)
    total = torch.zeros((), dtype=torch.float32, device=valid.device)
    for hs, ht in zip(student, teacher):
        hs, ht = hs.float(), ht.float()
        if "cosine" in kind:
            total = total + ((1.0 - F.cosine_similarity(hs, ht, dim=-1)) * valid).sum() / count
        if "mse" in kind:
            total = total + (((hs - ht) ** 2).mean(-1) * valid).sum() / count
    return total / len(student)


def attention_alignment(student: list[torch.Tensor], teacher: list[torch.Tensor],
                        attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over layer pairs of the attention-map loss (module docstring). Maps [b, heads, q, k]."""
    valid = attention_mask.float()
    pairs = valid[:, None, :, None] * valid[:, None, None, :]  # [b, 1, q, k]: both ends real tokens
    count = (valid.sum() * student[0].size(1)).clamp(min=1.0)  # rows: real query tokens x heads
    total = torch.zeros((), dtype=torch.float32, device=valid.device)
    for ps, pt in zip(student, teacher):
        total = total + (((ps.float() - pt.float()) ** 2) * pairs).sum() / count
    return total / len(student)


@contextmanager
def captured_layers(model: torch.nn.Module, layers: list[int], hidden: bool,
                    attention: bool) -> Iterator[tuple[dict, dict]]:
    """({layer: output [s, b, h]}, {layer: attention probabilities [b, heads, q, k]}) of the forwards run inside.

    ``model``: a ``BertModel`` or a wrapper of one (a DeepSpeed engine: its ``.module``)."""
    bert = getattr(model, "module", model)
    outputs: dict[int, torch.Tensor] = {}
    maps: dict[int, torch.Tensor] = {}
    handles = []
    for index in layers:
        layer = bert.encoder.layers[index]
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


def frozen_teacher(cfg: Config, teacher_cfg: Config, teacher_state: dict) -> torch.nn.Module:
    """The teacher module (TP=1, eval mode, no grad) in ``distill.teacher_precision`` (default: the run's)."""
    teacher_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.distill.teacher_precision
                                                                     or run_precision(cfg)]
    arch = get_arch(teacher_cfg.model.arch)
    # No activation checkpointing: the teacher runs without grad (only the student, built by the step, gets it).
    teacher = arch.build_model(teacher_cfg.model, cfg.parallel, *arch.section_args(teacher_cfg), dtype=teacher_dtype)
    load_full_state_dict(teacher, teacher_state)
    return teacher.eval().requires_grad_(False)


class BertDistillLoss:
    """The BERT distillation training loss for ``DenseStep`` (see the module docstring); ``student_init`` as in
    ``largelm.train.distill.DistillLoss``."""

    metric_prefix = "distill"

    def __init__(self, cfg: Config, init_student: bool = True):
        self.cfg = cfg
        d = cfg.distill
        teacher_cfg, teacher_state = teacher_weights(cfg)
        self.student_init = (every_kth_layer_state(teacher_state, cfg.model.num_layers, d.k,
                                                   get_arch(cfg.model.arch).layer_prefix)
                             if init_student and d.student_init == "every_kth_layer" else None)
        self.teacher = frozen_teacher(cfg, teacher_cfg, teacher_state)
        self.layer_pairs = aligned_layers(cfg) if d.aligns_layers else []
        self.device = groups.device()

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
        # The KL first: megatron's vocab-parallel cross entropy (in bert_metrics_from_logits) works in place on
        # the fp32 logits it is given.
        kl = masked_kl(s_logits, t_logits, batch["mlm_labels"], d.temperature, self.cfg.model.vocab_size)
        pair_label: Optional[torch.Tensor] = batch["pair_label"] if s_binary is not None else None
        hard = bert_metrics_from_logits(s_logits, s_binary, batch["mlm_labels"], pair_label, self.cfg.bert.objective)
        total = d.alpha * kl + (1.0 - d.alpha) * hard.pop("loss")
        out = {"kl": kl.detach(), **hard}
        if d.hidden_weight > 0:
            hidden = hidden_alignment(s_hidden, t_hidden, batch["attention_mask"], d.hidden_loss)
            total = total + d.hidden_weight * hidden
            out["hidden"] = hidden.detach()
        if d.attention_weight > 0:
            attention = attention_alignment(s_maps, t_maps, batch["attention_mask"])
            total = total + d.attention_weight * attention
            out["attention"] = attention.detach()
        return {"loss": total, **out}

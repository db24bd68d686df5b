"""KL(teacher || student) over a vocabulary split across the tensor-parallel group, never gathering it.

Each TP rank holds the logits of its vocabulary partition (megatron's output layer with ``parallel_output=True``:
rank r of t holds entries ``[r * V/t, (r + 1) * V/t)`` of the padded vocabulary V). As megatron's
``vocab_parallel_cross_entropy`` (megatron/core/tensor_parallel/cross_entropy.py), the log-softmax needs two TP
all-reduces per distribution: the max over the vocabulary (for stability) and the sum of exponentials. The KL's
sum over the vocabulary is then a local sum over the partition plus one TP all-reduce. Entries at or beyond
``vocab_size`` (the padding to a multiple of ``make_vocab_size_divisible_by x TP``) take no part: they are set to
-inf before the softmax, so they have zero probability under both distributions and zero gradient.

Backward (per token, of kl = sum_j p_t,j (log p_t,j - log p_s,j)): d kl / d s_j = p_s,j - p_t,j, where s are
the student's (temperature-scaled) logits; it is local to the partition (the max and the sum of exponentials cancel
out of it), so it needs no communication. The teacher gets no gradient (it is frozen).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.utils import VocabUtility


def _log_softmax_partition(logits: torch.Tensor, valid: torch.Tensor, group) -> torch.Tensor:
    """log softmax over the whole (split) vocabulary of this partition's ``logits`` (fp32); -inf where not
    ``valid``."""
    masked = logits.masked_fill(~valid, float("-inf"))
    # a partition may hold only padding (tiny vocabularies at large TP): its local max is -inf, which the MAX
    # all-reduce replaces by the other partitions' finite max
    local_max = masked.amax(dim=-1)
    if group is not None:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    shifted = masked - local_max.unsqueeze(-1)
    sum_exp = shifted.exp().sum(dim=-1)
    if group is not None:
        dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
    return shifted - sum_exp.log().unsqueeze(-1)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, group) -> torch.Tensor:
        log_p_s = _log_softmax_partition(student.float(), valid, group)
        log_p_t = _log_softmax_partition(teacher.float(), valid, group)
        p_t = log_p_t.exp()
        # 0 * (-inf - -inf) is nan: the padded entries are left out of the sum explicitly
        terms = torch.where(valid, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t))
        kl = terms.sum(dim=-1)
        if group is not None:
            dist.all_reduce(kl, op=dist.ReduceOp.SUM, group=group)
        ctx.save_for_backward(log_p_s, p_t)
        ctx.student_dtype = student.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor):
        log_p_s, p_t = ctx.saved_tensors
        grad = (log_p_s.exp() - p_t) * grad_kl.unsqueeze(-1)  # exp(-inf) = 0 on the padded entries
        return grad.to(ctx.student_dtype), None, None, None


def vocab_parallel_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int,
                      group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Per-token KL(softmax(teacher) || softmax(student)) [..] of vocabulary-parallel logits [.., V/t] (this rank's
    partition of both; same partition sizes), over the first ``vocab_size`` entries of the padded vocabulary;
    differentiable in ``student_logits``. Computed in fp32. ``group``: the tensor-parallel group (default:
    megatron's parallel_state); every rank of it gets the same result."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must be partitions of the same padded vocabulary")
    if group is None:
        group = parallel_state.get_tensor_model_parallel_group()
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    partition = student_logits.size(-1)
    start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(partition, rank, world_size)
    valid = torch.arange(start, start + partition, device=student_logits.device) < vocab_size
    return _VocabParallelKL.apply(student_logits, teacher_logits, valid,
                                  group if world_size > 1 else None)

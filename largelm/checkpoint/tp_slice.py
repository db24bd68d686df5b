"""One tensor-parallel rank's shard of a checkpoint's weights for any target TP, read from the checkpoint's TP ranks
that hold a part of it - never the whole model (distillation teachers built at the run's TP).

megatron-core's tensor-parallel layout (largelm/model/layout.py, largelm/parallel/sharding.py) cuts a tensor of
full length ``n`` along its partition dimension into ``stride`` chunks, and each chunk into TP contiguous slices;
rank r of t holds slice r of every chunk. So target rank r of t needs rows ``[r n / t, (r + 1) n / t)`` of each
chunk, and source rank j of the checkpoint's s holds rows ``[j n / s, (j + 1) n / s)``: the target shard is the
concatenation of the overlapping pieces, whatever s and t are (query groups stay whole because both TPs divide
their number). The vocabulary tensors are cut by rows of the *padded* vocabulary, which depends on the TP: the
target's real rows (below ``vocab_size``) come from the source ranks that hold them, its padding rows are zeros.
Replicated tensors come from the first source rank read.

Memory: the source ranks read for one target rank hold about 1/t + 1/s of the model (all of them at s=1, e.g. a
TP=1 teacher, which is the whole model: nothing smaller exists on disk).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from largelm.checkpoint.info import CheckpointInfo
from largelm.checkpoint.reader import tp_rank_weights
from largelm.errors import ConversionError
from largelm.model.layout import VOCAB_PARALLEL, check_tensor_parallel, is_gated, param_shapes, tp_partition


def _overlaps(lo: int, hi: int, per_source: int, sources: int) -> list[tuple[int, int, int]]:
    """``(source rank, start, stop)`` of the rows ``[lo, hi)`` (of one chunk) held by each source rank; start and
    stop are global row indices."""
    out = []
    for j in range(sources):
        a, b = max(lo, j * per_source), min(hi, (j + 1) * per_source)
        if a < b:
            out.append((j, a, b))
    return out


def slice_pieces(full_len: int, dim_stride: tuple[int, int], source_tp: int, tp: int, rank: int,
                 real_rows: Optional[int] = None, source_len: Optional[int] = None) -> list[tuple]:
    """The recipe of target rank ``rank``'s shard (TP ``tp``) of a tensor of full length ``full_len`` along its
    partition dimension, from the shards of ``source_tp`` ranks: a list of ``(source rank, local start, length)``
    pieces to concatenate along the dimension, or ``("zeros", length)`` for padding rows. Vocabulary tensors:
    ``real_rows`` = vocab_size (rows at or beyond it are padding, zero in the target), ``source_len`` = the source's
    padded length (``full_len`` is the target's)."""
    dim, stride = dim_stride
    source_len = source_len or full_len
    if full_len % (tp * stride) or source_len % (source_tp * stride):
        raise ConversionError(f"length {full_len} (source {source_len}) does not split into TP={tp} (source "
                              f"{source_tp}) x stride {stride} slices")
    n, n_src = full_len // stride, source_len // stride
    per_target, per_source = n // tp, n_src // source_tp
    pieces = []
    for k in range(stride):
        lo, hi = rank * per_target, (rank + 1) * per_target
        real_hi = hi if real_rows is None else max(lo, min(hi, real_rows))
        for j, a, b in _overlaps(lo, real_hi, per_source, source_tp):
            pieces.append((j, k * per_source + a - j * per_source, b - a))
        if hi > real_hi:
            pieces.append(("zeros", hi - real_hi))
    return pieces


def _assemble(pieces: list[tuple], shards: dict[int, dict[str, torch.Tensor]], name: str, dim: int) -> torch.Tensor:
    parts = []
    for piece in pieces:
        if piece[0] == "zeros":
            like = next(s[name] for s in shards.values())
            shape = list(like.shape)
            shape[dim] = piece[1]
            parts.append(like.new_zeros(shape))
        else:
            j, start, length = piece
            parts.append(shards[j][name].narrow(dim, start, length))
    return torch.cat(parts, dim=dim).contiguous()


def read_tp_slice(info: CheckpointInfo, rank: int, tp: int, padded_vocab: int, log=print,
                  keep: Optional[Callable[[str], bool]] = None) -> tuple[dict[str, torch.Tensor], list[int]]:
    """``(weights, source TP ranks read)``: target rank ``rank`` of ``tp``'s shard of every weight (fp32 masters
    where they exist, all pipeline stages and ZeRO partitions merged; ``GPTModel``/``BertModel`` names), the
    vocabulary tensors cut from a padded vocabulary of ``padded_vocab`` rows (padding rows zero). ``keep``: only the
    weights whose names it accepts (e.g. one pipeline stage's), the others dropped while the sources are read."""
    cfg, source_tp = info.config, info.tensor_parallel
    model = cfg.model
    check_tensor_parallel(model, tp)
    gated, vocab = is_gated(model), model.vocab_size
    source_padded = model.padded_vocab_size(source_tp)
    shapes = {name: shape for name, shape in param_shapes(model, cfg.bert, vocab_rows=padded_vocab).items()
              if keep is None or keep(name)}
    recipes = {}
    for name, shape in shapes.items():
        layout = tp_partition(name, gated)
        if layout is None:
            continue
        if name in VOCAB_PARALLEL:
            recipes[name] = slice_pieces(padded_vocab, layout, source_tp, tp, rank, vocab, source_padded)
        else:
            recipes[name] = slice_pieces(shape[layout[0]], layout, source_tp, tp, rank)
    needed = sorted({p[0] for pieces in recipes.values() for p in pieces if p[0] != "zeros"} or {0})
    shards = {j: tp_rank_weights(info, j, log=log, keep=keep)[0] for j in needed}
    first = shards[needed[0]]
    out = {}
    for name in shapes:
        if name not in first:
            raise ConversionError(f"{info.path}: the checkpoint lacks {name}")
        out[name] = _assemble(recipes[name], shards, name, tp_partition(name, gated)[0]) if name in recipes \
            else first[name].contiguous()
    return out, needed

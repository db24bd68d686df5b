"""Weight-only quantization math: round-to-nearest (RTN) and GPTQ; int8 or int4, per output channel or group-wise
along the input dimension, symmetric or asymmetric.

Conventions (one per format, shared by quantization, storage and the forward). ``QuantFormat(bits, group_size,
sym)``: ``group_size`` input columns share a scale (``None``: one per output row); ``sym`` default: int8
symmetric, int4 asymmetric.

* **int8 symmetric** (the "signed" layout): ``q`` int8 -128..127 [N, K], ``scale`` [N, groups], no zero point;
  ``W ~= q * scale``. Per channel, with bf16/fp16 activations, the forward uses ATen's kernel
  ``torch._weight_int8pack_mm`` (what torchao's int8 weight-only path calls on CPU); otherwise it dequantizes.
* **everything else** (int4; int8 asymmetric): unsigned codes 0 .. 2^bits - 1, ``scale`` and ``zero`` [N, groups];
  ``W ~= (q - zero) * scale``. Asymmetric: the zero point from each group's min/max (GPTQ's, torchao's
  ``ASYMMETRIC``); symmetric int4: zero fixed at 8 (the GPTQ format's ``sym``). int4 is stored packed two per byte
  (``pack_int4``: even column in the low nibble), int8 as uint8. Dequantized on the fly in the forward.
  ``min_zero=1`` keeps every asymmetric zero point >= 1 (the GPTQ v1 format stores ``zero - 1``): a group whose
  range would give zero 0 (all its weights >= 0) gets zero 1 and ``scale = max / (qmax - 1)`` instead.

The quantization parameters and the (de)quantization are torchao's primitives (``choose_qparams_affine``,
``quantize_affine``, ``dequantize_affine``); GPTQ's column loop is written here because torchao's GPTQ
(``torchao.prototype.gptq``) asserts a CUDA device and its int4 path needs the ``mslk`` kernels package.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

# torchao warns at import for each of its CUDA-only kernel libraries it cannot load on a CPU machine; nothing used
# here needs them.
_torchao_log = logging.getLogger("torchao")
_level = _torchao_log.level
_torchao_log.setLevel(logging.ERROR)
try:
    from torchao.quantization.quant_primitives import (
        MappingType,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )
finally:
    _torchao_log.setLevel(_level)

SCALE_DTYPE = torch.float16  # stored scales; the forward casts to the compute dtype


class QuantizationError(ValueError):
    """A model, layer or setting that this quantizer does not support; the message names it."""


@dataclass(frozen=True)
class QuantFormat:
    bits: int  # 8 or 4
    group_size: Optional[int] = None  # input columns per scale/zero point; None: one per output row (per channel)
    # None: the default of the bits (int8 symmetric, int4 asymmetric). Symmetric: scale = max|w| / ((qmax - qmin)
    # / 2) with zero 2^(bits-1) (int8: signed codes, no zero), the GPTQ format's ``sym=True`` convention that serving
    # kernels (vLLM's Marlin, ExLlama) require
    sym: Optional[bool] = None
    min_zero: int = 0  # smallest asymmetric zero point (1: representable in the GPTQ v1 format, which stores zero-1)

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise QuantizationError(f"bits={self.bits}: supported weight formats are int8 and int4")
        if self.group_size is not None and (self.group_size < 2 or (self.bits == 4 and self.group_size % 2)):
            raise QuantizationError(f"group_size={self.group_size}: needs None (per channel) or "
                                    f"{'an even group_size' if self.bits == 4 else 'a group_size'} >= 2")
        if self.min_zero not in (0, 1):
            raise QuantizationError(f"min_zero={self.min_zero}: 0 or 1")
        if self.sym is None:  # frozen dataclass: resolve the default once
            object.__setattr__(self, "sym", self.bits == 8)

    @property
    def signed(self) -> bool:
        """int8 symmetric: signed codes and no zero point (ATen's int8 kernel's layout)."""
        return self.bits == 8 and self.sym

    @property
    def qmin(self) -> int:
        return -128 if self.signed else 0

    @property
    def qmax(self) -> int:
        return 127 if self.signed else 2**self.bits - 1

    @property
    def qdtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    def group_width(self, in_features: int) -> int:
        return self.group_size or in_features

    def block(self, in_features: int) -> tuple[int, int]:
        return (1, self.group_width(in_features))

    def describe(self) -> str:
        g = f"group size {self.group_size}" if self.group_size else "per output channel"
        return f"int{self.bits}, {g}, {'symmetric' if self.sym else 'asymmetric'}"

    def check(self, name: str, weight_shape: tuple[int, ...]) -> None:
        if len(weight_shape) != 2:
            raise QuantizationError(f"{name}: weight of shape {tuple(weight_shape)} is not a 2-D linear weight")
        if self.group_size and weight_shape[1] % self.group_size:
            raise QuantizationError(f"{name}: in_features={weight_shape[1]} is not divisible by "
                                    f"group_size={self.group_size} (choose a group size that divides it)")
        if self.bits == 4 and weight_shape[1] % 2:
            raise QuantizationError(f"{name}: in_features={weight_shape[1]} is odd; int4 packs two columns per byte")


def qparams(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(scale [N, groups], zero [N, groups] int32, or None for signed int8) for weight ``w`` [N, K] (fp32)."""
    w = w.float()
    mapping = MappingType.SYMMETRIC if fmt.sym else MappingType.ASYMMETRIC
    scale, zero = choose_qparams_affine(w, mapping, fmt.block(w.shape[1]), fmt.qdtype, quant_min=fmt.qmin,
                                        quant_max=fmt.qmax, scale_dtype=torch.float32, zero_point_dtype=torch.int32)
    scale, zero = scale.reshape(w.shape[0], -1), zero.reshape(w.shape[0], -1)
    if fmt.signed:
        return scale, None
    if not fmt.sym and fmt.min_zero > 0:
        # zero 0 <=> the group's minimum rounds to code 0 (all weights >= 0, up to half a step): zero 1 and the
        # positive range over the remaining qmax - 1 steps; the codes clamp at 0 (an error under one step)
        low = zero < fmt.min_zero
        if low.any():
            top = w.reshape(w.shape[0], scale.shape[1], -1).amax(-1).clamp_min(torch.finfo(torch.float32).eps)
            scale = torch.where(low, top / (fmt.qmax - fmt.min_zero), scale)
            zero = torch.where(low, torch.full_like(zero, fmt.min_zero), zero)
    return scale, zero


def _zero_point(zero: Optional[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    # symmetric int8 has no stored zero point; torchao's integer zero-point domain wants a tensor
    return zero.to(torch.int32) if zero is not None else torch.zeros_like(scale, dtype=torch.int32)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], fmt: QuantFormat,
             block: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Integer weights (int8, or uint8 holding 0 .. 2^bits - 1) of ``w`` [N, K] with the given parameters."""
    block = block or fmt.block(w.shape[1])
    return quantize_affine(w.float(), block, scale.float(), _zero_point(zero, scale), fmt.qdtype, fmt.qmin, fmt.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], fmt: QuantFormat,
               dtype: torch.dtype = torch.float32, block: Optional[tuple[int, int]] = None) -> torch.Tensor:
    block = block or fmt.block(q.shape[1])
    return dequantize_affine(q, block, scale.float(), _zero_point(zero, scale), fmt.qdtype, fmt.qmin, fmt.qmax,
                             output_dtype=torch.float32).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] holding 0..15 -> uint8 [N, K/2]; column 2j in the low nibble, 2j+1 in the high nibble."""
    if q.shape[-1] % 2:
        raise QuantizationError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0xF, (packed >> 4) & 0xF
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


@dataclass
class QuantizedWeight:
    q: torch.Tensor  # int8 [N, K] (signed int8) or uint8 0 .. 2^bits - 1 [N, K] (unpacked)
    scale: torch.Tensor  # [N, groups]
    zero: Optional[torch.Tensor]  # [N, groups], or None (signed int8)
    fmt: QuantFormat

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero, self.fmt, dtype)


def quantize_rtn(w: torch.Tensor, fmt: QuantFormat) -> QuantizedWeight:
    """Round-to-nearest: each group's range mapped onto the integer grid."""
    scale, zero = qparams(w, fmt)
    return QuantizedWeight(quantize(w, scale, zero, fmt), scale, zero, fmt)


def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, fmt: QuantFormat, percdamp: float = 0.01,
                  block_size: int = 128) -> QuantizedWeight:
    """GPTQ (Frantar et al. 2022, Algorithm 1): quantize input columns left to right and push each column's error
    onto the not-yet-quantized columns through the inverse Hessian of the layer's inputs, minimising
    ``||X W^T - X Wq^T||^2`` on the calibration inputs. ``hessian`` = ``X^T X / n`` [K, K] (fp32).

    Per channel: the parameters from the whole weight before the loop (as RTN). Group-wise: each group's scale and
    zero point are chosen when the loop reaches the group's first column, from the weights as updated so far
    (GPTQ's reference implementation with static groups off).
    """
    w = w.detach().float().clone()
    n_rows, k = w.shape
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(k) * (percdamp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.zeros((n_rows, k), dtype=fmt.qdtype)
    gs = fmt.group_width(k)
    scale = torch.zeros((n_rows, k // gs))
    zero = None if fmt.signed else torch.zeros((n_rows, k // gs), dtype=torch.int32)
    if not fmt.group_size:
        scale, zero = qparams(w, fmt)
    else:  # blocks hold whole groups, so a group's parameters see all updates from earlier columns
        block_size = gs * max(1, block_size // gs)
    col_block = (1, 1)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col // gs
            if fmt.group_size and col % gs == 0:
                s, z = qparams(w1[:, i:i + gs], fmt)
                scale[:, g:g + 1] = s
                if zero is not None:
                    zero[:, g:g + 1] = z
            s_col = scale[:, g:g + 1]
            z_col = None if zero is None else zero[:, g:g + 1]
            column = w1[:, i:i + 1]
            qc = quantize(column, s_col, z_col, fmt, block=col_block)
            dq = dequantize(qc, s_col, z_col, fmt, block=col_block)
            q[:, col] = qc[:, 0]
            err = (column - dq)[:, 0] / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return QuantizedWeight(q, scale, zero, fmt)


def hessian_accumulator(in_features: int):
    """(update(x), result()) pair accumulating ``X^T X / n`` over inputs x [..., K] in fp32."""
    state = {"h": torch.zeros((in_features, in_features)), "n": 0}

    def update(x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, in_features).float()
        state["h"] += x.T @ x
        state["n"] += x.shape[0]

    def result() -> torch.Tensor:
        if state["n"] == 0:
            raise QuantizationError("GPTQ: no calibration input reached this layer")
        return state["h"] / state["n"]

    return update, result

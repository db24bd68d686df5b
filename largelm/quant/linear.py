"""``QuantLinear``: a quantized drop-in for megatron's Column/RowParallelLinear at TP=1 (formats: quant/core.py).

Stored: ``qweight`` (signed int8 [N, K]; asymmetric int8 uint8 [N, K]; int4 uint8 [N, K/2], two codes per byte),
``scale`` fp16 [N, groups], ``zero`` uint8 [N, groups] (none for signed int8). The forward dequantizes on the fly,
except per-channel signed int8 with bf16/fp16 activations, which runs ATen's ``torch._weight_int8pack_mm``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from largelm.quant.core import SCALE_DTYPE, QuantizedWeight, pack_int4, unpack_int4


class QuantLinear(torch.nn.Module):
    """Drop-in for megatron's Column/RowParallelLinear at TP=1: ``forward(x) -> (y, bias or None)``."""

    def __init__(self, qw: QuantizedWeight, bias: Optional[torch.Tensor], skip_bias_add: bool,
                 compute_dtype: torch.dtype, input_scale: Optional[torch.Tensor] = None):
        super().__init__()
        self.fmt = qw.fmt
        self.out_features, self.in_features = qw.q.shape
        self.skip_bias_add = skip_bias_add
        self.compute_dtype = compute_dtype
        # clone: fresh, allocator-aligned storage (tensors from safetensors' load_file can sit at unaligned offsets,
        # on which ATen's int8 kernel crashed)
        packed = pack_int4(qw.q) if qw.fmt.bits == 4 else qw.q.to(qw.fmt.qdtype).contiguous().clone()
        self.register_buffer("qweight", packed)
        self.register_buffer("scale", qw.scale.to(SCALE_DTYPE))
        self.register_buffer("zero", None if qw.zero is None else qw.zero.to(torch.uint8))
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))
        # AWQ's per-input-channel scale where it could not be folded into the previous op (largelm/quant/awq.py)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().float().clone())
        # _weight_int8pack_mm wants scales in the activation dtype; convert once
        self.register_buffer("_scale_rows", qw.scale.reshape(-1).to(SCALE_DTYPE).to(compute_dtype)
                             if self._int8_kernel_layout() else None, persistent=False)

    def _int8_kernel_layout(self) -> bool:
        """Per-channel signed int8: the layout of ATen's int8 weight-only kernel."""
        return self.fmt.signed and not self.fmt.group_size

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.qweight) if self.fmt.bits == 4 else self.qweight

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes(), self.scale.float(),
                               None if self.zero is None else self.zero.to(torch.int32), self.fmt)

    def weight_dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        if self._int8_kernel_layout():
            return self.qweight.to(dtype) * self._scale_rows.to(dtype).unsqueeze(1)
        groups = self.scale.shape[1]
        q = self.codes().to(dtype).view(self.out_features, groups, -1)
        if self.zero is not None:
            q = q - self.zero.to(dtype).unsqueeze(-1)
        return (q * self.scale.to(dtype).unsqueeze(-1)).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor, *_args, **_kwargs):
        x = x.to(self.compute_dtype)
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        # ATen's int8 weight-only kernel is fast for bf16/fp16 activations; on CPU its fp32 path is ~50x slower
        # than dequantize + F.linear (measured), so fp32 takes the dequantizing path.
        if self._int8_kernel_layout() and x.dtype in (torch.bfloat16, torch.float16):
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.qweight,
                                          self._scale_rows.to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight_dequantized(x.dtype))
        if self.bias is not None and not self.skip_bias_add:
            return y + self.bias, None
        return y, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        g = f", group_size={self.fmt.group_size}" if self.fmt.group_size else ""
        s = ", input_scale" if self.input_scale is not None else ""
        return f"in={self.in_features}, out={self.out_features}, int{self.fmt.bits}{g}, sym={self.fmt.sym}{s}"

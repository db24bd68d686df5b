"""A quantized largelm model as Hugging Face GPTQ tensors (``quant_method: gptq``, ``checkpoint_format: gptq``).

The on-disk layout is AutoGPTQ's ("v1"), which transformers/optimum, GPTQModel, vLLM and TGI read. Per linear
layer with ``K`` inputs, ``N`` outputs, ``G`` groups, ``b`` bits and ``pf = 32 / b`` codes per int32 word:

* ``qweight`` int32 ``[K / pf, N]``: word ``[r, n]`` holds the codes of input rows ``r*pf + j`` (j = 0..pf-1) of
  output column ``n`` at bits ``b*j .. b*j + b-1`` (little end first);
* ``qzeros`` int32 ``[G, N / pf]``: the zero points *minus one* (AutoGPTQ's historical offset, undone by every
  loader), packed along the output dimension the same way;
* ``scales`` fp16 ``[G, N]``; ``g_idx`` int32 ``[K]``: the group of each input row;
* dequantized: ``W[k, n] = scales[g_idx[k], n] * (code[k, n] - (zero[g_idx[k], n]))``, ``W`` ``[K, N]``: a
  ``Linear`` weight is ``W.T``, GPT-2's ``Conv1D`` weight is ``W`` itself (the packed layout is the same for both).

largelm's formats map onto it exactly (``QuantFormat(bits, group_size, sym)`` -> ``bits``, ``group_size`` or -1
per channel, ``sym``): unsigned codes and zero points as they are (symmetric: zero ``2^(bits-1)``, 8 or 128);
signed int8 (symmetric, codes -128..127, no zero) as codes + 128 and zero 128. A zero point of 0 cannot be written
(v1 stores ``0 - 1``, which does not fit ``bits`` bits): the export quantizes asymmetric formats with
``min_zero=1`` and refuses any layer that still has one.
Act-order (``desc_act``): GPTQ quantizes the input columns in order of decreasing Hessian diagonal;
``ActOrderQuantLinear`` keeps the codes in that order (groups contiguous there) and permutes its input, the export
writes the codes back in the original order with ``g_idx[perm[j]] = j // g``.

Names and row orders (fused QKV, ``[gate; up]``, Conv1D) come from the Hugging Face export adapters
(largelm/model/hf/): each per-row tensor of a layer (codes, scales, zero points, g_idx) is put in place of the
layer's weight and mapped by the same ``to_hf`` that maps the weights.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import torch

from largelm.config import Config
from largelm.model.layout import VOCAB_PARALLEL
from largelm.model.registry import get_arch
from largelm.quant.core import QuantFormat, QuantizationError, QuantizedWeight, quantize_gptq
from largelm.quant.model import (
    QuantLinear,
    collect_hessians,
    gpt_calibration_forward,
    target_layers,
)

WORD_BITS = 32
# Hugging Face classes whose linears are Conv1D ([in, out] weights); all others use nn.Linear ([out, in])
CONV1D_ARCHITECTURES = {"GPT2LMHeadModel"}


# --- act-order ------------------------------------------------------------------------------------------------

class ActOrderQuantLinear(QuantLinear):
    """``QuantLinear`` whose codes (and contiguous groups) are in the column order ``perm`` that GPTQ's act-order
    quantized them in: the input is permuted to match, ``y = x[..., perm] @ W_perm^T``."""

    def __init__(self, qw: QuantizedWeight, perm: torch.Tensor, bias, skip_bias_add: bool,
                 compute_dtype: torch.dtype):
        super().__init__(qw, bias, skip_bias_add, compute_dtype)
        self.register_buffer("perm", perm.to(torch.long))

    def forward(self, x: torch.Tensor, *args, **kwargs):
        return super().forward(x[..., self.perm], *args, **kwargs)


def quantize_gptq_act_order(w: torch.Tensor, hessian: torch.Tensor, fmt: QuantFormat,
                            percdamp: float = 0.01) -> tuple[QuantizedWeight, torch.Tensor]:
    """GPTQ with ``desc_act``: columns in order of decreasing ``diag(H)`` (the most "active" inputs first, so their
    errors are compensated by the most remaining columns). Returns (codes in that order, perm)."""
    perm = torch.argsort(torch.diag(hessian), descending=True, stable=True)
    return quantize_gptq(w[:, perm], hessian[perm][:, perm], fmt, percdamp), perm


@torch.no_grad()
def quantize_model_act_order(model: torch.nn.Module, fmt: QuantFormat, calibration: Iterable,
                             percdamp: float = 0.01, forward: Callable = gpt_calibration_forward) -> dict:
    """``quantize_model(..., method="gptq")`` with act-order: layers become ``ActOrderQuantLinear``."""
    targets = target_layers(model)
    for name, module in targets.items():
        fmt.check(name, tuple(module.weight.shape))
    hessians = collect_hessians(model, targets, calibration, forward)
    dtype = next(model.parameters()).dtype
    replaced = {}
    for name, module in targets.items():
        qw, perm = quantize_gptq_act_order(module.weight.detach().float(), hessians[name], fmt, percdamp)
        new = ActOrderQuantLinear(qw, perm, module.bias, module.skip_bias_add, dtype)
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, new)
        replaced[name] = new
    return replaced


# --- packing --------------------------------------------------------------------------------------------------

def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the same bits as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [K, N] (0 .. 2^bits - 1) -> int32 [K * bits / 32, N]: pf consecutive rows per word, first lowest."""
    pf = WORD_BITS // bits
    if codes.shape[0] % pf:
        raise QuantizationError(f"GPTQ packing: {codes.shape[0]} input rows are not a multiple of {pf}")
    shifts = (torch.arange(pf, dtype=torch.int64) * bits).view(1, pf, 1)
    c = codes.to(torch.int64).reshape(-1, pf, codes.shape[1])
    return _as_int32((c << shifts).sum(dim=1))


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [G, N] -> int32 [G, N * bits / 32]: pf consecutive columns per word, first lowest."""
    return pack_rows(codes.T.contiguous(), bits).T.contiguous()


def gptq_codes(qw: QuantizedWeight, perm: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-output-row tensors of one layer in the GPTQ convention, input columns in the original order:
    ``codes`` int32 [N, K] (unsigned), ``zeros`` int32 [N, G], ``scales`` fp32 [N, G] (fp16 values), ``g_idx``
    int32 [K]."""
    n, k = qw.q.shape
    if qw.fmt.signed:  # symmetric int8: unsigned codes with zero point 128
        codes = qw.q.to(torch.int32) + 128
        zeros = torch.full(tuple(qw.scale.shape), 128, dtype=torch.int32)
    else:
        codes, zeros = qw.q.to(torch.int32), qw.zero.to(torch.int32)
    group_of_position = torch.arange(k, dtype=torch.int32) // qw.fmt.group_width(k)
    scales = qw.scale.to(torch.float16).float()
    if perm is None:
        return {"codes": codes, "zeros": zeros, "scales": scales, "g_idx": group_of_position}
    original = torch.empty_like(codes)
    original[:, perm] = codes  # position j of the act-order holds original column perm[j]
    g_idx = torch.empty_like(group_of_position)
    g_idx[perm] = group_of_position
    return {"codes": original, "zeros": zeros, "scales": scales, "g_idx": g_idx}


# --- the whole model ------------------------------------------------------------------------------------------

def quantization_config(fmt: QuantFormat, act_order: bool, percdamp: float, tensors: dict) -> dict:
    """config.json's ``quantization_config`` for the Hugging Face GPTQ ``tensors`` (``hf_gptq_tensors``).
    ``block_name_to_quantize`` (the layer stack whose linears are quantized: ``transformer.h``, ``model.layers``,
    ``bert.encoder.layer``) is named because optimum's guess knows only decoder stacks."""
    blocks = {re.match(r"^(.*?)\.\d+\.", k).group(1) for k in tensors if k.endswith(".qweight")}
    if len(blocks) != 1:
        raise QuantizationError(f"quantized layers in {sorted(blocks)}: expected one layer stack")
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": fmt.bits,
            "group_size": fmt.group_size or -1, "desc_act": act_order,
            "sym": fmt.sym, "static_groups": False, "true_sequential": True, "damp_percent": percdamp,
            "pack_dtype": "int32", "lm_head": False, "block_name_to_quantize": blocks.pop(),
            "meta": {"quantizer": ["largelm"]}}


def hf_gptq_tensors(model: torch.nn.Module, cfg: Config, dtype: torch.dtype = torch.float16) -> dict:
    """Hugging Face GPTQ state dict of ``model`` (its transformer linears ``QuantLinear``/``ActOrderQuantLinear``,
    as ``quantize_model``/``quantize_model_act_order`` leave it); other tensors in ``dtype`` as the HF export writes
    them."""
    arch = get_arch(cfg.model.arch)
    section = arch.section_args(cfg)
    mapping = arch.hf_export(cfg.model)
    mapping.check_exportable(cfg.model)
    conv1d = mapping.architecture(*section) in CONV1D_ARCHITECTURES
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise QuantizationError("the model has no quantized layers to export")
    base = {}
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if isinstance(value, torch.Tensor) and owner not in layers and not key.endswith("_extra_state"):
            # the Hugging Face model has the real vocabulary only: the padding rows go
            value = value.detach().float()
            base[key] = value[: cfg.model.vocab_size] if key in VOCAB_PARALLEL else value
    fields = {}
    for name, layer in layers.items():
        per_row = gptq_codes(layer.quantized(), getattr(layer, "perm", None))
        per_row["g_idx"] = per_row["g_idx"].expand(layer.out_features, -1)
        for field, value in per_row.items():
            fields.setdefault(field, {})[name] = value
        base[f"{name}.weight"] = torch.zeros(layer.out_features, layer.in_features)
        if layer.bias is not None:
            base[f"{name}.bias"] = layer.bias.detach().float()
    plain = mapping.to_hf(cfg.model, base, *section)
    mapped = {field: mapping.to_hf(cfg.model, {**base, **{f"{n}.weight": v for n, v in values.items()}}, *section)
              for field, values in fields.items()}
    quantized = sorted(k for k, v in mapped["codes"].items() if v.dtype == torch.int32)
    out = {k: v.to(dtype).contiguous() for k, v in plain.items() if k not in quantized}
    formats = {(layer.fmt.bits, layer.fmt.group_size, layer.fmt.sym) for layer in layers.values()}
    if len(formats) != 1:
        raise QuantizationError(f"quantized layers in several formats {sorted(formats, key=str)}: one "
                                "quantization_config describes them all")
    bits = next(iter(layers.values())).fmt.bits
    pf = WORD_BITS // bits
    for key in quantized:
        prefix = key[: -len(".weight")]
        # -> [K, N] / [G, N] / [K]: Conv1D weights are already [in, out]; Linear weights are [out, in]
        codes, zeros, scales = (mapped[f][key] if conv1d else mapped[f][key].T for f in ("codes", "zeros", "scales"))
        g_idx = mapped["g_idx"][key][:, 0] if conv1d else mapped["g_idx"][key][0]
        if codes.shape[0] % pf or codes.shape[1] % pf:
            raise QuantizationError(f"{prefix}: {codes.shape[0]} inputs x {codes.shape[1]} outputs: int{bits} GPTQ "
                                    f"packs {pf} per int32 word along both (qweight, qzeros); both must be "
                                    f"multiples of {pf}")
        if (zeros < 1).any():
            raise QuantizationError(f"{prefix}: a zero point of 0 cannot be stored in the GPTQ v1 format (it stores "
                                    "zero - 1); quantize with QuantFormat(min_zero=1) (as tools/quantize.py "
                                    "--format hf-gptq does) or sym=True")
        out[f"{prefix}.qweight"] = pack_rows(codes, bits)
        out[f"{prefix}.qzeros"] = pack_cols(zeros - 1, bits)
        out[f"{prefix}.scales"] = scales.to(torch.float16).contiguous()
        out[f"{prefix}.g_idx"] = g_idx.to(torch.int32).contiguous()
    return out

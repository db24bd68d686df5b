"""AWQ: activation-aware weight quantization (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration"), on megatron GPTModel layers, with the integer formats of largelm/quant/core.py.

Per transformer layer, on calibration batches run through the model:

1. **Capture** the inputs of every layer's four linears, in one pass of the unquantized model over the calibration
   batches: the mean ``|x|`` of every input channel over all calibration tokens, and a random sample of
   ``search_tokens`` input rows (the same rows for every linear).
2. **Scale search** per linear: ``s = mean|x| ** alpha`` (normalised by ``sqrt(max(s) * min(s))``), for
   ``alpha = 0, 1/n_grid, ..., (n_grid-1)/n_grid``; the alpha minimising the linear's output error
   ``mean((X W^T - (X / s) Q(W diag(s))^T)^2)`` on the sampled rows wins (``Q``: round-to-nearest in the chosen
   format). ``alpha = 0`` is ``s = 1``, i.e. plain RTN, so the search never does worse than RTN on those rows.
   The loss is each linear's own output (as AutoAWQ does for linears without a wider ``module2inspect``); megatron
   fuses q, k and v into ``linear_qkv``, so "the linears sharing an input" are one module here.
3. **Fold** ``1/s`` into what produces the linear's input, where that is exact (the model's function unchanged):

   =================  ==========================================================================================
   ``linear_qkv``     ``input_layernorm`` (LayerNorm/RMSNorm weight and bias divided by ``s``)
   ``linear_fc1``     ``pre_mlp_layernorm``
   ``linear_proj``    the value rows of ``linear_qkv`` (weight and bias), when every attention head has its own
                      value head (``num_query_groups == num_attention_heads``): attention is linear in V
   ``linear_fc2``     the "up" half of ``linear_fc1`` when the MLP is gated (SwiGLU: ``silu(g) * u / s``)
   =================  ==========================================================================================

   Otherwise - ``linear_fc2`` after GELU (``gelu(z) / s`` is no function of ``z / s``), ``linear_proj`` with grouped
   query attention (one value channel feeds several heads, each wanting its own ``s``) - the layer keeps ``s`` as
   an explicit per-input-channel scale: ``QuantLinear`` divides its input by it (llm-awq's ``ScaledActivation``
   does the same for GELU). It costs one elementwise divide of the input and ``4 * in_features`` bytes.
4. **Clip search** (optional): per output row and quantization group, shrink the weight range to
   ``r * [min, max]``, ``r = 1, 0.975, ..., 0.525``, keeping the ``r`` with the least output error of that group's
   partial products on ``clip_tokens`` rows (``r = 1`` is no clipping). Skipped for ``linear_qkv``, as llm-awq does:
   query/key errors are amplified by the attention softmax, which this per-linear loss does not see.

Each layer's inputs are those of the full-precision layers before it, as in AutoAWQ (llm-awq also feeds forward
its clipped weights). One capture pass suffices because the folds do not change the function: capturing layer
``i + 1`` after folding layers ``0..i`` (what llm-awq and AutoAWQ do, running the model layer by layer) would see the
same inputs. Memory: ``search_tokens x in_features`` fp32 per linear, kept for all layers at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from largelm.model.gpt import split_tokens
from largelm.quant.core import QuantFormat, QuantizationError, QuantizedWeight, quantize_rtn

LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
N_GRID = 20  # alpha grid (llm-awq)
CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5  # clip ratios 1 - i / CLIP_GRID for i < CLIP_MAX_SHRINK * CLIP_GRID (llm-awq)
CLIP_ROW_BATCH = 256  # output rows per clip-search step (bounds the [tokens, rows, groups] partial products)


def fake_quantize(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``w`` quantized by round-to-nearest and dequantized (fp32)."""
    return quantize_rtn(w, fmt).dequantize()


def output_error(reference: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """Mean squared difference between ``reference`` and ``x @ w^T`` (the linear's output without bias)."""
    return (reference - x @ w.T).pow(2).mean().item()


@dataclass
class ScaleSearch:
    scale: torch.Tensor  # [K] fp32: the weight's input columns are multiplied by it, the input divided by it
    alpha: float
    error: float  # output error at ``alpha`` on the sampled rows
    error_rtn: float  # the same at alpha = 0 (s = 1: round-to-nearest)


@torch.no_grad()
def search_scale(x: torch.Tensor, w: torch.Tensor, fmt: QuantFormat, act_mean: Optional[torch.Tensor] = None,
                 n_grid: int = N_GRID) -> ScaleSearch:
    """The AWQ scale of a linear with weight ``w`` [N, K] for inputs ``x`` [n, K] (``act_mean``: mean ``|x|`` per
    input channel, default from ``x``): the grid point of ``alpha`` with the least output error."""
    x, w = x.float(), w.float()
    act_mean = (x.abs().mean(0) if act_mean is None else act_mean).float()
    reference = x @ w.T
    best: Optional[ScaleSearch] = None
    error_rtn = math.inf
    for i in range(n_grid):
        alpha = i / n_grid
        s = act_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # alpha = 0: exactly 1 everywhere
        error = output_error(reference, x / s, fake_quantize(w * s, fmt))
        if i == 0:
            error_rtn = error
        if best is None or error < best.error:
            best = ScaleSearch(s, alpha, error, error_rtn)
    if best is None or not math.isfinite(best.error):
        raise QuantizationError(f"AWQ scale search found no finite error (errors non-finite; n_grid={n_grid})")
    best.error_rtn = error_rtn
    return best


@torch.no_grad()
def search_clip(x: torch.Tensor, w: torch.Tensor, fmt: QuantFormat, grid: int = CLIP_GRID,
                max_shrink: float = CLIP_MAX_SHRINK) -> torch.Tensor:
    """``w`` [N, K] with each (row, quantization group) clipped to ``r * [min, max]`` of its values, ``r`` chosen
    per group to minimise that group's output error on inputs ``x`` [n, K] (``r = 1``: unclipped)."""
    x, w = x.float(), w.float()
    n_rows, k = w.shape
    gs = fmt.group_width(k)
    xg = x.reshape(x.shape[0], k // gs, gs)
    out = w.clone()
    for r0 in range(0, n_rows, CLIP_ROW_BATCH):
        wb = w[r0:r0 + CLIP_ROW_BATCH]
        wg = wb.reshape(wb.shape[0], k // gs, gs)
        reference = torch.einsum("ngk,ogk->nog", xg, wg)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        best_err = torch.full(wg.shape[:2], math.inf)
        best = wg.clone()
        for i in range(int(max_shrink * grid)):
            ratio = 1 - i / grid
            clipped = torch.clamp(wg, lo * ratio, hi * ratio)
            dq = fake_quantize(clipped.reshape(wb.shape), fmt).reshape(wg.shape)
            err = (torch.einsum("ngk,ogk->nog", xg, dq) - reference).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better.unsqueeze(-1), clipped, best)
        out[r0:r0 + CLIP_ROW_BATCH] = best.reshape(wb.shape)
    return out


# --- capture a layer's inputs -------------------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by a hook after the layer of interest: the rest of the model need not run."""


@dataclass
class LinearInputs:
    act_mean: torch.Tensor  # [K] mean |x| over all calibration tokens
    sample: torch.Tensor  # [n, K] sampled input rows


@torch.no_grad()
def capture_inputs(model: torch.nn.Module, linears: dict[str, torch.nn.Module], batches: list[torch.Tensor],
                   sample_tokens: int, generator: torch.Generator, stop_after: Optional[torch.nn.Module] = None
                   ) -> dict[str, LinearInputs]:
    """Inputs of ``linears`` over ``batches`` (tokens [b, s+1]); the forward stops after ``stop_after`` runs, if
    given (the rest of the model is not needed)."""
    per_batch = max(1, math.ceil(sample_tokens / max(1, len(batches))))
    sums = {name: 0.0 for name in linears}
    counts = {name: 0 for name in linears}
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    rows: dict[str, torch.Tensor] = {}

    def record(name, x):
        x = x.detach().reshape(-1, x.shape[-1]).float()
        sums[name] = sums[name] + x.abs().sum(0)
        counts[name] += x.shape[0]
        if x.shape[0] not in rows:  # the same rows for every linear of a batch
            rows[x.shape[0]] = torch.randperm(x.shape[0], generator=generator)[:per_batch]
        samples[name].append(x[rows[x.shape[0]]])

    def stop(*_):
        raise _StopForward

    handles = [m.register_forward_pre_hook(lambda _m, args, _n=name: record(_n, args[0]))
               for name, m in linears.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    try:
        for tokens in batches:
            rows.clear()
            input_ids, _, position_ids = split_tokens(tokens)
            try:
                model(input_ids, position_ids, None)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, c in counts.items() if c == 0]
    if missing:
        raise QuantizationError(f"AWQ: no calibration input reached {missing}")
    return {name: LinearInputs(sums[name] / counts[name], torch.cat(samples[name])[:sample_tokens])
            for name in linears}


# --- folding ------------------------------------------------------------------------------------------------------

def _fold_into_norm(norm: torch.nn.Module, linear: torch.nn.Module, s: torch.Tensor) -> None:
    norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    linear.weight.mul_(s.to(linear.weight.dtype).unsqueeze(0))


def _fold_into_rows(prev: torch.nn.Module, rows: torch.Tensor, linear: torch.nn.Module, s: torch.Tensor) -> None:
    """``prev``'s output rows ``rows`` (which are ``linear``'s input channels, in order) divided by ``s``."""
    prev.weight[rows] = prev.weight[rows] / s.to(prev.weight.dtype).unsqueeze(1)
    if prev.bias is not None:
        prev.bias[rows] = prev.bias[rows] / s.to(prev.bias.dtype)
    linear.weight.mul_(s.to(linear.weight.dtype).unsqueeze(0))


def value_rows(config) -> Optional[torch.Tensor]:
    """Rows of megatron's fused ``linear_qkv`` holding the values, in ``linear_proj``'s input-channel order, or None
    if heads share value heads (grouped query attention: no exact fold). megatron's layout: per query group
    ``[q (heads per group x kv_channels), k (kv_channels), v (kv_channels)]``."""
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    if groups != heads:
        return None
    hn = config.kv_channels
    return torch.cat([torch.arange(h * 3 * hn + 2 * hn, h * 3 * hn + 3 * hn) for h in range(heads)])


def _check_foldable(model: torch.nn.Module) -> None:
    config = model.config
    if getattr(config, "layernorm_zero_centered_gamma", False):
        raise QuantizationError("AWQ: layernorm_zero_centered_gamma norms cannot take folded scales")
    if getattr(config, "apply_residual_connection_post_layernorm", False):
        raise QuantizationError("AWQ: apply_residual_connection_post_layernorm: the norm's output also feeds the "
                                "residual, so scales cannot be folded into it")


def _norm(layer: torch.nn.Module, name: str) -> torch.nn.Module:
    norm = getattr(layer, name)
    if not isinstance(norm, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or norm.weight is None:
        raise QuantizationError(f"AWQ: {name} is {type(norm).__name__}; scales fold only into an affine "
                                "torch LayerNorm/RMSNorm")
    return norm


# --- the method ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def quantize_awq(model: torch.nn.Module, targets: dict[str, torch.nn.Module], fmt: QuantFormat,
                 calibration: Iterable[torch.Tensor], *, n_grid: int = N_GRID, clip: bool = True,
                 search_tokens: int = 2048, clip_tokens: int = 512, seed: int = 0
                 ) -> tuple[dict[str, tuple[QuantizedWeight, Optional[torch.Tensor]]], dict[str, dict]]:
    """AWQ of the transformer linears ``targets`` (name -> megatron linear, four per layer) of GPTModel ``model``.

    Modifies ``model`` in place by the exact folds (norms, value rows, up rows; its function is unchanged) and
    returns ``(weights, stats)``: ``weights[name] = (quantized weight, explicit input scale or None)`` - the layer
    computes ``(x / input_scale) @ dequantized^T`` - and ``stats[name]`` = alpha, output errors (AWQ and RTN on the
    sampled calibration rows) and where the scale went.
    """
    if n_grid < 1:
        raise QuantizationError(f"AWQ: n_grid must be >= 1, got {n_grid}")
    batches = list(calibration)
    if not batches:
        raise QuantizationError("AWQ needs calibration batches")
    _check_foldable(model)
    generator = torch.Generator().manual_seed(seed)
    gated = bool(getattr(model.config, "gated_linear_unit", False))
    v_rows = value_rows(model.config)
    prefixes = sorted({name.rsplit(".", 2)[0] for name in targets}, key=lambda p: int(p.rsplit(".", 1)[1]))
    for prefix in prefixes:
        missing = [f"{prefix}.{short}" for short in LINEARS if f"{prefix}.{short}" not in targets]
        if missing:
            raise QuantizationError(f"AWQ: {prefix} lacks {missing} (it scales all four linears of a layer)")
    model.eval()
    captured = capture_inputs(model, targets, batches, search_tokens, generator)
    weights, stats = {}, {}
    for prefix in prefixes:
        names = {short: f"{prefix}.{short}" for short in LINEARS}
        layer = model.get_submodule(prefix)
        mods = {short: targets[name] for short, name in names.items()}
        inputs = {short: captured.pop(name) for short, name in names.items()}
        found = {short: search_scale(inputs[short].sample, mods[short].weight, fmt, inputs[short].act_mean, n_grid)
                 for short in LINEARS}
        qkv, proj, fc1, fc2 = (mods[s] for s in LINEARS)
        explicit, fold = {}, {}
        # fc2 first, then fc1's own columns: each fold keeps the function, so the order only decides which
        # weights the later ones see
        if gated:
            up = torch.arange(fc1.weight.shape[0] // 2, fc1.weight.shape[0])
            _fold_into_rows(fc1, up, fc2, found["mlp.linear_fc2"].scale)
            fold["mlp.linear_fc2"] = "linear_fc1 up rows"
        else:
            explicit["mlp.linear_fc2"] = found["mlp.linear_fc2"].scale
            fold["mlp.linear_fc2"] = "explicit input scale (after GELU)"
        _fold_into_norm(_norm(layer, "pre_mlp_layernorm"), fc1, found["mlp.linear_fc1"].scale)
        fold["mlp.linear_fc1"] = "pre_mlp_layernorm"
        if v_rows is not None:
            _fold_into_rows(qkv, v_rows, proj, found["self_attention.linear_proj"].scale)
            fold["self_attention.linear_proj"] = "linear_qkv value rows"
        else:
            explicit["self_attention.linear_proj"] = found["self_attention.linear_proj"].scale
            fold["self_attention.linear_proj"] = "explicit input scale (grouped query attention)"
        _fold_into_norm(_norm(layer, "input_layernorm"), qkv, found["self_attention.linear_qkv"].scale)
        fold["self_attention.linear_qkv"] = "input_layernorm"
        for short in LINEARS:
            s = found[short].scale
            w = mods[short].weight.detach().float()
            if short in explicit:
                w = w * s
            if clip and short != "self_attention.linear_qkv":
                w = search_clip(inputs[short].sample[:clip_tokens] / s, w, fmt)
            weights[names[short]] = (quantize_rtn(w, fmt), explicit.get(short))
            stats[names[short]] = {"alpha": found[short].alpha, "error": found[short].error,
                                   "error_rtn": found[short].error_rtn, "scale_to": fold[short],
                                   "clipped": bool(clip and short != "self_attention.linear_qkv")}
    return weights, stats

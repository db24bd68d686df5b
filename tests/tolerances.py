"""Tolerances of the numerics tests (``pytest -m numerics``), each derived from a stated error model.

None is fitted to one machine's rounding: CPUs differ in vector width, FMA use, matmul blocking and bf16 kernels
(an AVX2-only CPU rounds differently from an AVX-512 one; .ci/run runs these tests a second time under
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``), so a bound must follow from the arithmetic. Two models:

* **Reduction chains** (``sum_rtol``, ``chain_length``): an fp32 result that passes through reductions of total
  length n (dot products, norms, softmax sums, means over tokens) has relative error about sqrt(n) * u in the
  probabilistic rounding model (Higham & Mary 2019; rounding errors independent, mean zero; the deterministic
  worst case n * u needs every rounding to align), u = 2^-24 the fp32 unit roundoff. Two evaluations that differ
  only in summation order, blocking, FMA use or tensor-parallel splits each lie within LAMBDA * sqrt(n) * u of the
  exact value, so they differ by at most ``2 * LAMBDA * sqrt(n) * u`` relative to the result's magnitude (logits:
  max |logit|; losses: |loss|).
  LAMBDA = 3: a few times the typical sqrt(n) * u error, far below the O(1e-3 .. 1) relative error of a real bug
  (a wrong weight mapping, a missing all-reduce, a gradient averaged over the wrong group).
* **Comparison to a float64 reference** (``f64_bound``): an fp32 implementation that differs from a trusted one only
  in how it rounds (a TP=2 split, another attention kernel) must be as accurate as the trusted one: per tensor, its
  error against a float64 evaluation of the same function is at most ``K_F64`` (= 4) x the trusted fp32 error, plus
  K_F64 roundings of the tensor's largest value (for tensors the trusted implementation happens to get exact). This
  adapts to the machine (each CPU measures its own fp32 error) without being fitted to it; measured: errors at most
  1.8x the trusted one's (0.45 of the bound), natively and under AVX2 emulation.

bf16 bounds use u_bf16 = 2^-8 (``UBF16``): a bf16 value is within one rounding, relative 2^-8, of its fp32 source,
and two bf16 roundings of nearly equal fp32 values differ by at most one bf16 ulp (relative 2^-7).
"""

from __future__ import annotations

import math

import torch

U32 = 2.0 ** -24  # fp32 unit roundoff (torch.finfo(torch.float32).eps / 2)
UBF16 = 2.0 ** -8  # bf16 unit roundoff (torch.finfo(torch.bfloat16).eps / 2)
LAMBDA = 3.0  # reduction-chain errors: bound = LAMBDA x the typical sqrt(n) * u, per evaluation
K_F64 = 4.0  # float64-reference comparisons: allowed error = K_F64 x the trusted fp32 implementation's


def sum_rtol(n: int, u: float = U32) -> float:
    """Relative difference allowed between two fp32 evaluations of a length-``n`` reduction chain that differ only
    in rounding (order, blocking, FMA, TP split): 2 x LAMBDA x sqrt(n) x u (see the module docstring)."""
    return 2 * LAMBDA * math.sqrt(n) * u


def chain_length(*, layers: int, hidden: int, ffn: int, seq: int, heads: int, vocab: int = 0, tokens: int = 1,
                 extra: int = 0, backward: bool = False) -> int:
    """n of a transformer's output for ``sum_rtol``: the reduction lengths a value passes through.

    Per layer: two norms (``hidden`` each), the QKV projection (``hidden``), the scores (head dim), softmax and
    P @ V (``seq`` each), the output projection and fc1 (``hidden`` each), fc2 (``ffn``); then the final norm and
    the logit projection (``hidden`` each), the vocabulary softmax (``vocab``, 0 for logits), ``extra`` (other
    reductions on the path, e.g. BERT's LM-head dense layer and norm: 2 x ``hidden``) and a mean over
    ``tokens``. ``backward=True`` (gradients, gradient norms, losses after optimizer steps): the gradient runs the
    chain back again and every weight gradient sums over ``tokens``.
    """
    per_layer = 2 * hidden + hidden + hidden // heads + 2 * seq + 2 * hidden + ffn
    forward = layers * per_layer + 2 * hidden + vocab + extra
    return (2 * forward + tokens) if backward else (forward + tokens)


def fp32_rounding_tol(n: int, magnitude: float) -> float:
    """Absolute bound for two fp32 evaluations of a length-``n`` chain whose result has size ``magnitude``."""
    return sum_rtol(n) * magnitude


def model_chain(model, *, seq: int | None = None, vocab: int = 0, tokens: int = 1, backward: bool = False) -> int:
    """``chain_length`` of a ``largelm.config.ModelConfig`` (BERT adds its LM head's dense layer and norm); ``seq``
    defaults to the model's positions."""
    return chain_length(layers=model.num_layers, hidden=model.hidden_size, ffn=model.ffn_size,
                        seq=seq or model.positions, heads=model.num_attention_heads, vocab=vocab, tokens=tokens,
                        extra=2 * model.hidden_size if model.arch == "bert" else 0, backward=backward)


def logit_tol(model, max_abs_logit: float, seq: int | None = None) -> float:
    """Two fp32 forwards of the same model and weights (megatron at any TP x PP, transformers, the reference GPT):
    ``fp32_rounding_tol`` of the logits' reduction chain relative to max(1, max |logit|)."""
    return fp32_rounding_tol(model_chain(model, seq=seq), max(1.0, max_abs_logit))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64."""
    return (a.detach().double() - b.detach().double()).abs().max().item()


def f64_bound(trusted: torch.Tensor, exact: torch.Tensor) -> float:
    """Allowed max |x - exact| for an fp32 ``x`` that must be as accurate as ``trusted`` (fp32) against the float64
    ``exact``: K_F64 x (max |trusted - exact| + one fp32 rounding of max |exact|)."""
    return K_F64 * (max_err(trusted, exact) + U32 * exact.detach().abs().max().item())


def fp32_adam_drift(steps: int, lr: float, n: int) -> float:
    """Absolute bound for fp32 weights after ``steps`` AdamW steps of two runs whose gradients differ by rounding.

    Adam normalises each update to about ``lr``; a relative gradient difference d changes it by about ``lr * d``,
    with d <= sum_rtol(n) for a length-n chain. Entries whose gradient is itself near the rounding level are
    amplified more (the normalisation divides by their size), hence 4x: 4 * steps * lr * sum_rtol(n).
    """
    return 4 * steps * lr * sum_rtol(n)


def bf16_adam_drift(steps: int, lr: float) -> float:
    """Absolute bound for the fp32 master weights of two bf16 runs whose rounding differs, after ``steps`` steps.

    Once a master weight sits at a bf16 rounding boundary in one run and not the other (a few per 100k after any
    difference of one fp32 ulp), the bf16 weights differ by one bf16 rounding, the next gradients by about u_bf16
    relative, and each normalised Adam update by about ``lr * u_bf16``: steps * lr * u_bf16 after ``steps`` steps.
    Bound 8x that: Adam amplifies entries whose gradient is near zero (measured: up to 2.3x the model, natively and
    under AVX2 emulation).
    """
    return 8 * steps * lr * UBF16


def loss_f64_bound(loss32: float, loss64: float, logit_err: float) -> float:
    """Allowed |loss - loss64| for an fp32 loss that must be as accurate as a trusted fp32 ``loss32``: a cross
    entropy moves by at most 2 x the largest logit error (its gradient in the logits, softmax - one-hot, has L1 norm
    <= 2) plus its own rounding; ``logit_err`` is the trusted max |logits32 - logits64|. K_F64 x that."""
    return K_F64 * (abs(loss32 - loss64) + 2 * logit_err + U32 * abs(loss64))


def adamw_step_tol(param: torch.Tensor, update_size: torch.Tensor) -> torch.Tensor:
    """Elementwise bound for one fp32 AdamW step against the same step in float64, from the same inputs.

    ``param``: the weights before the step; ``update_size``: the float64 size of the update's terms before they
    cancel, lr / (1 - beta1^t) * (beta1 |m| + (1 - beta1) |g|) / (sqrt(v_hat) + eps) (``|new - old|`` on a first
    step). The fp32 step rounds the decayed weight, its (1 - lr * wd) factor and the result (<= 1.5 ulp of the weight
    together) and the update through about 10 operations (clip, both moments, sqrt, division, bias corrections:
    <= 10 u relative to its terms); the bound is twice that: 3 ulp(param) + 20 u update_size.
    """
    p = param.detach().float().abs()
    ulp = (torch.nextafter(p, torch.full_like(p, math.inf)) - p).double()
    return 3 * ulp + 20 * U32 * update_size.detach().double().abs()

"""The core attentions of largelm/model/attention.py compute what megatron's DotProductAttention computes, forward
and backward, for MHA and GQA, fp32 and bf16; attention dropout draws the same masks from megatron's RNG stream;
padding masks go to megatron's path; and ``model.attention`` picks them as documented.

Tolerances (tests/tolerances.py): fp32 outputs and gradients must be as accurate as megatron's fp32 ones against
megatron's attention run in float64 (``f64_bound``; measured 0.2x the bound natively and under AVX2 emulation);
bf16 ones as close to the fp32 result as megatron's bf16 ones."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from tolerances import U32, f64_bound, max_err

from largelm.config import ModelConfig, ParallelConfig
from largelm.model.attention import KINDS, BmmAttention, CausalBmmAttention, core_attention_kind
from largelm.model.specs import build_transformer_config
from largelm.parallel.cpu_compat import model_parallel_manual_seed

FAST = ["sdpa", "bmm"]
pytestmark = pytest.mark.numerics


def _pair(kind: str, groups: int, dropout: float = 0.0, dtype=torch.float32):
    model_parallel_manual_seed(0)  # megatron's tensor-parallel RNG stream (attention dropout draws from it)
    model = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=groups, seq_length=16,
                        attention_dropout=dropout)
    config = build_transformer_config(model, ParallelConfig(), dtype, on_cuda=False)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return KINDS[kind](**kwargs), DotProductAttention(**kwargs)


def _qkv(groups: int, seed: int = 0, dtype=torch.float32):
    """q, k, v [s, b, heads, d] as megatron's SelfAttention hands them over: strided views into one fused
    projection [s, b, groups, (heads/groups + 2) * d]."""
    g = torch.Generator().manual_seed(seed)
    s, b, d, per_group = 16, 3, 16, 4 // groups
    mixed = torch.randn(s, b, groups, (per_group + 2) * d, generator=g).to(dtype).requires_grad_()
    q, k, v = torch.split(mixed, [per_group * d, d, d], dim=3)
    return mixed, [q.reshape(s, b, 4, d), k, v]


def _forward_backward(module, groups, dtype, mask=None):
    mixed, qkv = _qkv(groups, dtype=dtype)
    out = module(*qkv, mask)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    return out, mixed.grad


@pytest.mark.parametrize("groups", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("kind", FAST)
def test_fast_path_equals_megatron_attention_fp32(tp1, kind, groups):
    ours, megatron = _pair(kind, groups)
    out_a, grad_a = _forward_backward(ours, groups, torch.float32)
    out_b, grad_b = _forward_backward(megatron, groups, torch.float32)
    out_x, grad_x = _forward_backward(megatron, groups, torch.float64)  # the exact values (megatron has no weights)
    assert out_a.shape == out_b.shape == (16, 3, 64) and out_x.dtype == torch.float64
    # as accurate as megatron's fp32 attention, against float64 (tolerances.f64_bound)
    assert max_err(out_a, out_x) <= f64_bound(out_b, out_x)
    assert max_err(grad_a, grad_x) <= f64_bound(grad_b, grad_x)


@pytest.mark.parametrize("groups", [4, 2], ids=["mha", "gqa"])
def test_bmm_attention_bf16_is_as_close_to_fp32_as_megatrons(tp1, groups):
    """bf16: both round differently from exact arithmetic; ours must be no further from the fp32 result than megatron's
    own bf16 path: the mean error over 3072 values is a stable statistic of the rounding (within 1.5x of megatron's),
    the max one extreme value of it (within 2x), plus one fp32 rounding of the reference (measured ratios: 0.5-1.03,
    natively and under AVX2 emulation)."""
    reference = _forward_backward(_pair("local", groups)[1], groups, torch.float32)
    ours = _forward_backward(_pair("bmm", groups, dtype=torch.bfloat16)[0], groups, torch.bfloat16)
    megatron = _forward_backward(_pair("bmm", groups, dtype=torch.bfloat16)[1], groups, torch.bfloat16)
    for i, name in enumerate(("output", "grad")):
        err_ours = (ours[i].float() - reference[i]).abs()
        err_meg = (megatron[i].float() - reference[i]).abs()
        assert ours[i].dtype == torch.bfloat16
        floor = U32 * reference[i].abs().max().item()
        assert err_ours.mean() <= 1.5 * err_meg.mean() + floor, name
        assert err_ours.max() <= 2 * err_meg.max() + floor, name


def test_bmm_attention_dropout_draws_megatrons_masks(tp1):
    """With dropout in training, the same RNG stream gives the same keep-masks as megatron's ``nn.Dropout``: the same
    output and gradients, not merely 'some dropout'."""
    ours, megatron = _pair("bmm", 4, dropout=0.3)
    ours.train(), megatron.train()
    model_parallel_manual_seed(7)
    out_a, grad_a = _forward_backward(ours, 4, torch.float32)
    model_parallel_manual_seed(7)
    out_b, grad_b = _forward_backward(megatron, 4, torch.float32)
    model_parallel_manual_seed(7)
    out_x, grad_x = _forward_backward(megatron, 4, torch.float64)  # the same masks (drawn independently of dtype)
    clean = _forward_backward(ours.eval(), 4, torch.float32)[0]
    assert max_err(out_a, clean) > 100 * f64_bound(out_b, out_x)  # dropout acted, far beyond rounding
    # the same masks: as accurate as megatron's fp32 attention with them, against float64 (tolerances.f64_bound)
    assert max_err(out_a, out_x) <= f64_bound(out_b, out_x)
    assert max_err(grad_a, grad_x) <= f64_bound(grad_b, grad_x)


def test_causal_bmm_attention_gradcheck():
    """The hand-written backward against finite differences (fp64), with and without a dropout mask. gradcheck's
    own tolerances (atol 1e-5, rtol 1e-3) sit far above float64 central differences' error at eps 1e-6
    (truncation ~eps^2, rounding ~2^-53 / eps ~ 1e-10) and far below a wrong backward's O(1)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: CausalBmmAttention.apply(q, k, v, 0.5, 0.0), (q, k, v))

    def dropped(q, k, v):
        torch.manual_seed(3)  # the same mask at every evaluation
        return CausalBmmAttention.apply(q, k, v, 0.5, 0.4)

    assert torch.autograd.gradcheck(dropped, (q, k, v))


@pytest.mark.parametrize("kind", FAST)
def test_padding_masks_take_megatrons_path(tp1, monkeypatch, kind):
    ours, megatron = _pair(kind, 4)
    ours.attn_mask_type = megatron.attn_mask_type = AttnMaskType.padding
    mask = torch.zeros(3, 1, 16, 16, dtype=torch.bool)
    mask[1, :, :, 12:] = True  # padded keys
    mask[1, :, 12:, :] = True  # and fully masked (padded) query rows: SDPA would give NaN there
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", None)  # must not be called
    monkeypatch.setattr(CausalBmmAttention, "apply", None)
    _, q = _qkv(4)
    out = ours(*q, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, megatron(*q, mask), rtol=0, atol=0)  # the same code path: bit-identical


@pytest.mark.parametrize("kind", FAST)
def test_attention_dropout_is_applied_in_training(tp1, kind):
    ours, _ = _pair(kind, 4, dropout=0.5)
    _, q = _qkv(4)
    ours.eval()
    clean = ours(*q, None)
    ours.train()
    assert max_err(ours(*q, None), clean) > 1000 * U32 * clean.abs().max().item()  # far beyond any rounding


def test_model_attention_setting():
    auto, local, sdpa, bmm = (ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, seq_length=4, attention=a)
                              for a in ("auto", "local", "sdpa", "bmm"))
    assert core_attention_kind(auto, on_cuda=True) == "sdpa"
    assert core_attention_kind(auto, on_cuda=False) == "bmm"  # measured faster on CPU (bench/README.md)
    assert core_attention_kind(local, on_cuda=True) == "local" and core_attention_kind(sdpa, on_cuda=False) == "sdpa"
    assert core_attention_kind(bmm, on_cuda=True) == "bmm" and KINDS["bmm"] is BmmAttention

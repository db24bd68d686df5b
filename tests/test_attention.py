"""SDPAttention (largelm/model/attention.py) computes what megatron's DotProductAttention computes, forward and
backward, for MHA and GQA; hands padding masks to megatron's path; and ``model.attention`` picks it as documented."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from largelm.config import ModelConfig, ParallelConfig
from largelm.model.attention import SDPAttention, use_sdpa
from largelm.model.specs import build_transformer_config


def _pair(groups: int, dropout: float = 0.0):
    from largelm.parallel.cpu_compat import model_parallel_manual_seed

    model_parallel_manual_seed(0)  # megatron's tensor-parallel RNG stream (attention dropout draws from it)
    model = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=groups, seq_length=16,
                        attention_dropout=dropout)
    config = build_transformer_config(model, ParallelConfig(), on_cuda=False)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return SDPAttention(**kwargs), DotProductAttention(**kwargs)


def _qkv(groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s, b, d = 16, 3, 16
    return [torch.randn(s, b, n, d, generator=g, requires_grad=True) for n in (4, groups, groups)]


@pytest.mark.parametrize("groups", [4, 2], ids=["mha", "gqa"])
def test_sdpa_equals_megatron_attention(tp1, groups):
    ours, megatron = _pair(groups)
    a, b = _qkv(groups), _qkv(groups)
    out_a, out_b = ours(*a, None), megatron(*b, None)
    assert out_a.shape == out_b.shape == (16, 3, 64)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-5)
    grad = torch.randn_like(out_a)
    out_a.backward(grad)
    out_b.backward(grad)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=1e-5)


def test_padding_masks_take_megatrons_path(tp1, monkeypatch):
    ours, megatron = _pair(4)
    ours.attn_mask_type = megatron.attn_mask_type = AttnMaskType.padding
    mask = torch.zeros(3, 1, 16, 16, dtype=torch.bool)
    mask[1, :, :, 12:] = True  # padded keys
    mask[1, :, 12:, :] = True  # and fully masked (padded) query rows: SDPA would give NaN there
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", None)  # must not be called
    q = _qkv(4)
    out = ours(*q, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, megatron(*q, mask), rtol=0, atol=0)


def test_attention_dropout_is_applied_in_training(tp1):
    ours, _ = _pair(4, dropout=0.5)
    q = _qkv(4)
    ours.eval()
    clean = ours(*q, None)
    ours.train()
    assert not torch.allclose(ours(*q, None), clean)


def test_model_attention_setting():
    auto, local, sdpa = (ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=2, seq_length=4, attention=a)
                         for a in ("auto", "local", "sdpa"))
    assert use_sdpa(auto, bf16=False, on_cuda=False) and use_sdpa(auto, bf16=True, on_cuda=True)
    assert not use_sdpa(auto, bf16=True, on_cuda=False)  # measured slower there (bench/README.md)
    assert not use_sdpa(local, bf16=False, on_cuda=True) and use_sdpa(sdpa, bf16=True, on_cuda=False)

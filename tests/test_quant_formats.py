"""Quantization formats ``QuantFormat(bits, group_size, sym)`` beyond the defaults: int8 with groups, asymmetric
int4/int8, per-channel int4, with and without act-order. Unit level, on random matrices: the Hugging Face GPTQ codes
(largelm/quant/hf_gptq.py) unpacked by tests/test_quant_hf.py's reference dequantization (written from the format
description) give the weight largelm's layer multiplies by; largelm's own format round-trips them; the
tools/quantize.py flags map onto them and refuse bad combinations. The end-to-end exports are in test_quant_hf.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from mp_utils import single_rank_parallel_state
from test_quant_hf import GROUP, _config, _quantize_tool, reference_dequantize
from train_utils import REPO

from largelm.quant import QuantFormat, QuantLinear, build_model, load_quantized, quantize_model, save_quantized
from largelm.quant.core import quantize_rtn
from largelm.quant.hf_gptq import (
    ActOrderQuantLinear,
    gptq_codes,
    pack_cols,
    pack_rows,
    quantization_config,
    quantize_gptq_act_order,
)

# (bits, group_size, sym, act_order): every combination the format has, on random matrices (cheap)
UNIT_CASES = [(4, GROUP, True, False), (4, GROUP, True, True), (8, None, True, True), (8, GROUP, True, False),
              (8, GROUP, True, True), (4, GROUP, False, False), (4, GROUP, False, True), (8, GROUP, False, True),
              (8, None, False, False), (4, None, True, False), (4, None, False, True)]


@pytest.mark.parametrize("bits,group,sym,act_order", UNIT_CASES,
                         ids=[f"int{b}-g{g or -1}{'' if s else '-asym'}{'-act' if a else ''}"
                              for b, g, s, a in UNIT_CASES])
def test_codes_dequantize_to_the_layer_largelm_computes(bits, group, sym, act_order):
    """gptq_codes -> pack -> reference unpacking reproduces the weight the (act-order) QuantLinear multiplies by;
    the stored zero points are 2^(bits-1) when symmetric and the per-group ones (>= 1) when not."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 64, generator=g) * torch.linspace(0.1, 3.0, 64)  # unequal input scales: a real order
    w = torch.randn(40, 64, generator=g)
    w[:8] = w[:8].abs()  # non-negative rows: asymmetric zero point 0 without min_zero (v1 cannot store it)
    fmt = QuantFormat(bits, group, sym, min_zero=1)
    if act_order:
        qw, perm = quantize_gptq_act_order(w, x.T @ x / x.shape[0], fmt)
        assert not torch.equal(perm, torch.arange(64))
        layer = ActOrderQuantLinear(qw, perm, None, False, torch.float32)
    else:
        qw, perm = quantize_rtn(w, fmt), None
        layer = QuantLinear(qw, None, False, torch.float32)
    c = gptq_codes(layer.quantized(), perm)
    zeros = c["zeros"].T
    n_groups = 64 // (group or 64)
    assert zeros.shape == (n_groups, 40) and c["codes"].max() < 2**bits and c["codes"].min() >= 0
    if sym:
        assert torch.all(zeros == 2 ** (bits - 1))
    else:
        assert int(zeros.min()) >= 1 and len(set(zeros.flatten().tolist())) > 1
    w_ref = reference_dequantize(pack_rows(c["codes"].T.contiguous(), bits), pack_cols(zeros.contiguous() - 1, bits),
                                 c["scales"].T.half(), c["g_idx"], bits).T
    xs = torch.randn(5, 64, generator=g)
    y, _ = layer(xs)
    torch.testing.assert_close(y, xs @ w_ref.T, rtol=1e-5, atol=1e-5)
    # the quantization error is the format's: half a step per weight, plus |code - zero| <= 2^(bits-1) times the
    # scale's rounding to fp16 (the codes were chosen with the fp32 scale); GPTQ's error feedback moves some more
    step = c["scales"][:, c["g_idx"].long()]
    within = (w_ref - w).abs() <= step * (0.5 + 2.0 ** (bits - 1) * 2.0**-11)
    assert within.float().mean() > 0.5 if act_order else within.all()
    if act_order:
        assert len(set(c["g_idx"].tolist())) == n_groups


@pytest.mark.parametrize("bits,group,sym", [(8, GROUP, False), (8, GROUP, True), (4, None, False)])
def test_quantization_config_names_the_format(bits, group, sym):
    qc = quantization_config(QuantFormat(bits, group, sym), False, 0.01, {"model.layers.0.mlp.up_proj.qweight": 0})
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (bits, group or -1, sym)
    assert qc["checkpoint_format"] == "gptq" and qc["block_name_to_quantize"] == "model.layers"


@pytest.mark.parametrize("fmt", [QuantFormat(8, GROUP, sym=False), QuantFormat(8, GROUP), QuantFormat(4, None, True)],
                         ids=lambda f: f.describe())
def test_largelm_format_roundtrips_the_new_formats(fmt, tmp_path):
    """largelm's own format (save_quantized / load_quantized) stores grouped and asymmetric int8 and per-channel int4:
    the loaded model's logits equal the quantized model's bit for bit."""
    cfg = _config("gpt2", 1000, Path("unused.model"))
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)
    with single_rank_parallel_state():
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        quantize_model(model, fmt)
        for p in model.parameters():  # the store is bf16: the same rounded unquantized tensors on both sides
            p.data = p.data.bfloat16().float()
        for m in model.modules():
            if isinstance(m, QuantLinear) and m.bias is not None:
                m.bias = m.bias.bfloat16().float()
        save_quantized(model, cfg, tmp_path / "q", method="rtn", fmt=fmt)
        loaded, _ = load_quantized(tmp_path / "q")
        with torch.no_grad():
            ours, theirs = model(ids, pos, None), loaded(ids, pos, None)
    meta = json.loads((tmp_path / "q" / "quant.json").read_text())
    assert (meta["bits"], meta["group_size"], meta["sym"]) == (fmt.bits, fmt.group_size, fmt.sym)
    layer = next(m for m in loaded.modules() if hasattr(m, "qweight"))
    assert layer.fmt == QuantFormat(fmt.bits, fmt.group_size, fmt.sym)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("flags,message", [
    (("--bits", "4", "--group-size", "7"), "--group-size 7: int4 needs -1 (per output channel) or an even number"),
    (("--bits", "8", "--group-size", "1"), "--group-size 1: int8 needs -1"),
    (("--format", "hf-gptq", "--method", "rtn", "--act-order"), "--act-order needs --method gptq"),
    (("--format", "hf-gptq", "--method", "awq", "--no-sym"), "--format hf-gptq takes --method rtn or gptq"),
])
def test_tool_refuses_bad_format_flags(tmp_path, flags, message):
    """Usage errors naming the flag, before torch or the checkpoint is loaded (the checkpoint does not exist)."""
    proc = _quantize_tool("--checkpoint", tmp_path / "none", "--out", tmp_path / "out", *flags)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_tool_format_flags():
    """--group-size -1 / --sym / --no-sym / --asymmetric -> the QuantFormat; hf-gptq defaults to symmetric and keeps
    asymmetric zero points storable (min_zero=1)."""
    spec = importlib.util.spec_from_file_location("quantize_tool", REPO / "tools" / "quantize.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def fmt(*flags):
        return tool.quant_format(tool.parse_args(["--checkpoint", "c", "--out", "o", *flags]))

    assert fmt() == QuantFormat(8, None, True) and fmt("--bits", "4") == QuantFormat(4, 128, False)
    assert fmt("--bits", "8", "--group-size", "32", "--asymmetric") == QuantFormat(8, 32, False)
    assert fmt("--bits", "4", "--group-size", "-1", "--sym") == QuantFormat(4, None, True)
    assert fmt("--format", "hf-gptq", "--bits", "4") == QuantFormat(4, 128, True, min_zero=1)
    assert fmt("--format", "hf-gptq", "--group-size", "32", "--no-sym") == QuantFormat(8, 32, False, min_zero=1)

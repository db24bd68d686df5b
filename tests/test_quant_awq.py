"""AWQ (largelm/quant/awq.py): the scale search, the exact folds, a trained tiny model, save/load.

Error models: the scale search's error at alpha = 0 is computed by the same operations on the same tensors as plain
round-to-nearest (s = 1 exactly), so "never worse than RTN" holds bit for bit. A fold multiplies a weight by s and
divides the producer by s: a few fp32 roundings per element (relative ~eps = 6e-8) per layer, carried through the
tiny model's 4 layers and attention softmax, so logits agree to 1e-5 of their magnitude.
"""

from __future__ import annotations

import pytest
import torch
from mp_utils import single_rank_parallel_state
from quant_utils import calibration_batches, fresh_model, quant_tiny_config, train_in_process
from train_utils import tiny_config

from largelm.quant import (
    QuantFormat,
    QuantLinear,
    build_model,
    load_quantized,
    perplexity,
    quantize_model,
    save_quantized,
)
from largelm.quant.awq import fake_quantize, output_error, quantize_awq, search_clip, search_scale
from largelm.quant.model import read_meta, target_layers

GROUP = 32
INT4_PPL_BOUND = 1.10  # vs fp32, as tests/test_quant.py
AWQ_VS_RTN_PPL_BOUND = 1.02  # AWQ int4 may not beat RTN on a briefly trained tiny model, but not lose by more


def _outlier_inputs(seed: int, n: int = 1024, k: int = 128):
    """Inputs with a few large channels (what AWQ is for) and a weight."""
    g = torch.Generator().manual_seed(seed)
    gain = torch.ones(k)
    gain[torch.randperm(k, generator=g)[:4]] = 20.0
    x = torch.randn(n, k, generator=g) * gain
    w = torch.randn(48, k, generator=g) * 0.1
    return x, w


@pytest.mark.parametrize("bits,group", [(8, None), (4, 16), (4, 64)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scale_search_never_worse_than_rtn(bits, group, seed):
    fmt = QuantFormat(bits, group)
    x, w = _outlier_inputs(seed)
    found = search_scale(x, w, fmt)
    rtn = output_error(x @ w.T, x, fake_quantize(w, fmt))
    assert found.error_rtn == rtn  # alpha = 0 is RTN, bit for bit
    assert found.error <= rtn
    # and the search does find something on outlier channels (the test could fail: a broken search returns RTN)
    assert found.alpha > 0 and found.error < 0.8 * rtn, (found.alpha, found.error, rtn)
    effective = fake_quantize(w * found.scale, fmt) / found.scale  # what the layer computes, written back on W
    assert output_error(x @ w.T, x, effective) == pytest.approx(found.error, rel=1e-4)


def test_scale_search_on_uniform_inputs_may_keep_rtn():
    """With no channel standing out, scales carry no information; whatever wins is still <= RTN."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(512, 64, generator=g), torch.randn(32, 64, generator=g)
    found = search_scale(x, w, QuantFormat(4, 16))
    assert found.error <= found.error_rtn


@pytest.mark.parametrize("bits,group", [(8, None), (4, 16)])
def test_clip_search_never_worse_per_group(bits, group):
    fmt = QuantFormat(bits, group)
    x, w = _outlier_inputs(3, n=256, k=64)
    clipped = search_clip(x, w, fmt)
    gs = 64 if bits == 8 else group
    xg = x.reshape(x.shape[0], -1, gs)

    def group_errors(wq):
        ref = torch.einsum("ngk,ogk->nog", xg, w.reshape(w.shape[0], -1, gs))
        return (torch.einsum("ngk,ogk->nog", xg, wq.reshape(w.shape[0], -1, gs)) - ref).pow(2).mean(0)

    rtn, clip = group_errors(fake_quantize(w, fmt)), group_errors(fake_quantize(clipped, fmt))
    assert (clip <= rtn * (1 + 1e-5)).all()
    assert (clipped.abs() <= w.abs()).all() and not torch.equal(clipped, w)


# --- on megatron models -------------------------------------------------------------------------------------------

def _calibration(cfg, count=4, seed=1):
    return calibration_batches(cfg, count, 8, seed)


@pytest.mark.parametrize("style,groups,expected_proj,expected_fc2", [
    ("gpt2", None, "linear_qkv value rows", "explicit input scale (after GELU)"),
    ("llama", None, "linear_qkv value rows", "linear_fc1 up rows"),
    ("llama", 2, "explicit input scale (grouped query attention)", "linear_fc1 up rows"),
])
def test_folds_keep_the_model_function(tmp_path, tokenizer_path, shard_dir, shard_seq_length, style, groups,
                                       expected_proj, expected_fc2):
    """After the folds (norms, value rows, up rows) the full-precision model computes the same logits."""
    from largelm.model.gpt import split_tokens
    from largelm.parallel.cpu_compat import model_parallel_manual_seed

    cfg = quant_tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length, style=style, num_query_groups=groups)
    calib = _calibration(cfg, count=2)
    ids, _, pos = split_tokens(calib[0])
    with single_rank_parallel_state():
        torch.manual_seed(0)
        model_parallel_manual_seed(0)
        model = build_model(cfg).eval()
        with torch.no_grad():  # norms away from their init (ones / zeros), so a fold into them is visible
            for name, p in model.named_parameters():
                if "layernorm" in name:
                    p.add_(0.3 * torch.randn_like(p))
        before = model(ids, pos, None)
        _, stats = quantize_awq(model, target_layers(model), QuantFormat(4, GROUP), calib)
        after = model(ids, pos, None)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5 * before.abs().max().item())
    assert len(stats) == 4 * cfg.model.num_layers
    first = "decoder.layers.0."
    assert stats[first + "self_attention.linear_qkv"]["scale_to"] == "input_layernorm"
    assert stats[first + "mlp.linear_fc1"]["scale_to"] == "pre_mlp_layernorm"
    assert stats[first + "self_attention.linear_proj"]["scale_to"] == expected_proj
    assert stats[first + "mlp.linear_fc2"]["scale_to"] == expected_fc2
    assert any(s["alpha"] > 0 for s in stats.values())  # scales were really applied somewhere


@pytest.fixture(scope="module")
def trained(tokenizer_path, shard_dir, shard_seq_length, tmp_path_factory):
    """(cfg, fp32 state dict, tmp dir, fp32 validation metrics) of a tiny GPT trained 40 AdamW steps in-process."""
    tmp = tmp_path_factory.mktemp("awq")
    cfg = quant_tiny_config(tmp, tokenizer_path, shard_dir, shard_seq_length)
    state, base = train_in_process(cfg, shard_dir, shard_seq_length)
    return cfg, state, tmp, base


def test_awq_int4_perplexity_vs_rtn_and_search_errors(trained):
    cfg, state, _, base = trained
    calib = _calibration(cfg)
    stats: dict = {}
    with single_rank_parallel_state():
        rtn = fresh_model(cfg, state)
        quantize_model(rtn, QuantFormat(4, GROUP), "rtn")
        awq = fresh_model(cfg, state)
        quantize_model(awq, QuantFormat(4, GROUP), "awq", calib, stats=stats)
        ppl = {"rtn": perplexity(rtn, cfg, batch_size=16)["ppl"], "awq": perplexity(awq, cfg, batch_size=16)["ppl"]}
    print({"fp32": base["ppl"], **ppl})
    assert base["ppl"] < 400, f"tiny model did not learn: ppl {base['ppl']}"
    assert ppl["awq"] < base["ppl"] * INT4_PPL_BOUND, (base, ppl)
    assert ppl["awq"] < ppl["rtn"] * AWQ_VS_RTN_PPL_BOUND, ppl
    assert len(stats) == 8 and all(s["error"] <= s["error_rtn"] for s in stats.values()), stats
    assert sum(isinstance(m, QuantLinear) for m in awq.modules()) == 8


@pytest.mark.parametrize("bits,group", [(4, GROUP), (8, None)])
def test_awq_save_load_roundtrip(trained, tmp_path, bits, group):
    """The loaded checkpoint computes what the in-memory quantized model computes once its unquantized tensors
    are rounded to bf16 as stored (norms with folded scales, embeddings, biases); gpt2 style keeps fc2's explicit
    input scale, which must come back."""
    from largelm.model.gpt import split_tokens

    cfg, state, _, _ = trained
    fmt = QuantFormat(bits, group)
    ids, _, pos = split_tokens(_calibration(cfg, count=1, seed=7)[0])
    with single_rank_parallel_state():
        model = fresh_model(cfg, state)
        quantize_model(model, fmt, "awq", _calibration(cfg, count=2), awq_options={"n_grid": 10})
        save_quantized(model, cfg, tmp_path / "q", method="awq", fmt=fmt)
        loaded, _ = load_quantized(tmp_path / "q")
        with torch.no_grad():
            for module in model.modules():
                tensors = [module.bias] if isinstance(module, QuantLinear) else list(module.parameters(False))
                for t in tensors:
                    if t is not None:
                        t.copy_(t.to(torch.bfloat16).float())
        expected, got = model(ids, pos, None), loaded(ids, pos, None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    fc2 = loaded.get_submodule("decoder.layers.0.mlp.linear_fc2")
    assert fc2.input_scale is not None and torch.equal(
        fc2.input_scale, model.get_submodule("decoder.layers.0.mlp.linear_fc2").input_scale)
    assert loaded.get_submodule("decoder.layers.0.self_attention.linear_qkv").input_scale is None
    assert read_meta(tmp_path / "q")["method"] == "awq"


@pytest.mark.slow
def test_quantize_tool_awq_on_launcher_checkpoint(tokenizer_path, shard_dir, shard_seq_length, tmp_path):
    """tools/quantize.py --method awq on a checkpoint written by the real launcher: the report, the AWQ record in
    quant.json, and a directory load_quantized reads back with the explicit fc2 input scales."""
    import json
    import subprocess
    import sys

    from train_utils import REPO, check_ok, launch

    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length,
                         train={"steps": 2, "precision": "fp32", "micro_batch_size": 4, "grad_accum_steps": 1,
                                "eval_interval": 0, "log_interval": 1, "seed": 1})
    check_ok(launch(config, nproc=1))
    out = tmp_path / "int4-awq"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "quantize.py"), "--checkpoint", str(tmp_path / "ckpt"),
                           "--out", str(out), "--bits", "4", "--group-size", "32", "--method", "awq",
                           "--calib-batches", "2", "--eval-batches", "2", "--awq-grid", "5",
                           "--awq-search-tokens", "256"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "awq" and report["bytes"]["quantized"] < report["bytes"]["bf16"]
    meta = read_meta(out)
    assert meta["method"] == "awq" and meta["awq"]["options"]["n_grid"] == 5
    assert len(meta["awq"]["layers"]) == 8 and all(s["error"] <= s["error_rtn"] for s in meta["awq"]["layers"].values())
    with single_rank_parallel_state():
        model, _ = load_quantized(out)
    assert model.get_submodule("decoder.layers.1.mlp.linear_fc2").input_scale is not None

"""Weight-only quantization (largelm.quant) and generation (largelm.model.generate).

Fast tests train a tiny GPT in-process (plain AdamW, 40 steps) on the test shards and quantize it; the slow test runs
tools/quantize.py on a real launcher checkpoint. Bounds on the validation perplexity vs the fp32 model: int8 < +1%,
int4 (group 32, RTN and GPTQ) < +10%. This briefly trained model is dominated by its (unquantized) embeddings, so
the measured changes are tiny (int8/int4 within +-0.01%); ``test_quantized_logits_move_by_the_expected_amount``
checks that the quantized layers are really in the forward (logits move, int4 more than int8). Measurements on a
properly trained model: bench-style numbers in the report of tools/quantize.py.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from mp_utils import single_rank_parallel_state
from quant_utils import calibration_batches, fresh_model, quant_tiny_config, train_in_process
from train_utils import REPO, check_ok, launch, tiny_config

from largelm.quant import (
    QuantFormat,
    QuantizationError,
    QuantLinear,
    load_quantized,
    perplexity,
    quantize_gptq,
    quantize_model,
    quantize_rtn,
    save_quantized,
)
from largelm.quant.core import pack_int4, unpack_int4
from largelm.quant.model import dir_bytes, read_meta

INT8_PPL_BOUND = 1.01
INT4_PPL_BOUND = 1.10
GROUP = 32


# --- math -------------------------------------------------------------------------------------------------------

def test_int4_pack_roundtrip():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed[0, 0], (q[0, 0] | (q[0, 1] << 4)).to(torch.uint8))


FORMATS = [(8, None, None), (4, 16, None), (8, 16, True), (8, 16, False), (8, None, False), (4, 16, True),
           (4, None, True)]


@pytest.mark.parametrize("bits,group,sym", FORMATS)
def test_rtn_error_is_within_half_a_step(bits, group, sym):
    w = torch.randn(32, 64)
    fmt = QuantFormat(bits, group, sym)
    qw = quantize_rtn(w, fmt)
    step = qw.scale.repeat_interleave(64 // qw.scale.shape[1], dim=1)
    assert ((qw.dequantize() - w).abs() <= step * 0.5 + 1e-6).all()
    signed = bits == 8 and sym is not False
    assert int(qw.q.min()) >= (-128 if signed else 0) and int(qw.q.max()) <= (127 if signed else 2**bits - 1)
    assert (qw.zero is None) == signed and qw.scale.shape == (32, 64 // (group or 64))
    if fmt.sym and not signed:
        assert torch.all(qw.zero == 2 ** (bits - 1))


@pytest.mark.parametrize("bits,group,sym", FORMATS)
def test_gptq_beats_rtn_on_correlated_inputs(bits, group, sym):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 64, generator=g)  # low-rank, correlated inputs
    x += 0.05 * torch.randn(2048, 64, generator=g)
    w = torch.randn(48, 64, generator=g)
    fmt = QuantFormat(bits, group, sym)
    h = x.T @ x / x.shape[0]
    err = {name: ((x @ (qw.dequantize() - w).T) ** 2).mean().item()
           for name, qw in (("rtn", quantize_rtn(w, fmt)), ("gptq", quantize_gptq(w, h, fmt)))}
    assert err["gptq"] < 0.7 * err["rtn"], err


def test_formats_refuse_bad_settings():
    with pytest.raises(QuantizationError, match="bits=3"):
        QuantFormat(3)
    with pytest.raises(QuantizationError, match="even group_size"):
        QuantFormat(4, 7)
    with pytest.raises(QuantizationError, match="group_size=1"):
        QuantFormat(8, 1)
    for bits in (4, 8):
        with pytest.raises(QuantizationError, match="layer.x: in_features=64 is not divisible by group_size=48"):
            QuantFormat(bits, 48).check("layer.x", (8, 64))
    with pytest.raises(QuantizationError, match="layer.y: in_features=63 is odd"):
        QuantFormat(4).check("layer.y", (8, 63))


def test_gptq_chooses_group_parameters_when_it_reaches_the_group():
    """Group-wise GPTQ: the first group's scale/zero come from the untouched weights (RTN's), later groups' from the
    weights as the error feedback left them (so they differ from RTN's); per channel: RTN's, from the start."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)
    w = torch.randn(24, 64, generator=g)
    h = x.T @ x / x.shape[0]
    for fmt in (QuantFormat(8, 16, sym=False), QuantFormat(4, 16)):
        gptq, rtn = quantize_gptq(w, h, fmt, percdamp=0.0), quantize_rtn(w, fmt)
        assert torch.equal(gptq.zero[:, 0], rtn.zero[:, 0]) and torch.allclose(gptq.scale[:, 0], rtn.scale[:, 0])
        assert not torch.allclose(gptq.scale[:, 1:], rtn.scale[:, 1:])
    per_channel = QuantFormat(8, None, sym=False)
    gptq, rtn = quantize_gptq(w, h, per_channel, percdamp=0.0), quantize_rtn(w, per_channel)
    assert torch.equal(gptq.zero, rtn.zero) and torch.allclose(gptq.scale, rtn.scale)


@pytest.mark.parametrize("bits", [4, 8])
def test_min_zero_keeps_asymmetric_zero_points_storable(bits):
    """``min_zero=1`` (the GPTQ v1 export): groups of non-negative weights get zero 1 instead of 0, still within
    half a step (their positive range spread over qmax - 1 steps)."""
    w = torch.randn(16, 64)
    w[:4] = w[:4].abs()  # all-positive rows: zero point 0 in every group without min_zero
    assert int(quantize_rtn(w, QuantFormat(bits, 16, sym=False)).zero[:4].max()) == 0
    qw = quantize_rtn(w, QuantFormat(bits, 16, sym=False, min_zero=1))
    assert int(qw.zero.min()) == 1
    step = qw.scale.repeat_interleave(16, dim=1)
    assert ((qw.dequantize() - w).abs() <= step * 0.5 * (1 + 1e-5)).all()


# --- a trained tiny model -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tokenizer_path, shard_dir, shard_seq_length, tmp_path_factory):
    """(cfg, fp32 state dict, out dir, fp32 metrics) of a tiny GPT trained 40 AdamW steps in-process."""
    tmp = tmp_path_factory.mktemp("quant")
    cfg = quant_tiny_config(tmp, tokenizer_path, shard_dir, shard_seq_length)
    state, base = train_in_process(cfg, shard_dir, shard_seq_length)
    return cfg, state, tmp, base


@pytest.fixture(scope="module")
def exported(trained):
    """bits/method -> (quantized checkpoint dir, reloaded validation metrics)."""
    cfg, state, tmp, base = trained
    out = {}
    with single_rank_parallel_state():
        save_quantized(fresh_model(cfg, state), cfg, tmp / "bf16", method="none", fmt=None)
        out["bf16"] = (tmp / "bf16", perplexity(load_quantized(tmp / "bf16")[0], cfg, batch_size=16))
        calib = [b for b in _calibration(cfg)]
        for key, fmt, method in (("int8", QuantFormat(8), "rtn"), ("int4", QuantFormat(4, GROUP), "rtn"),
                                 ("int4-gptq", QuantFormat(4, GROUP), "gptq")):
            model = fresh_model(cfg, state)
            quantize_model(model, fmt, method, calib if method == "gptq" else None)
            save_quantized(model, cfg, tmp / key, method=method, fmt=fmt)
            loaded, _ = load_quantized(tmp / key)
            out[key] = (tmp / key, perplexity(loaded, cfg, batch_size=16))
    return out


def _calibration(cfg):
    return calibration_batches(cfg, 8, 16)


def test_quantized_perplexity_within_bounds(trained, exported):
    base = trained[3]["ppl"]
    assert base < 400, f"tiny model did not learn: ppl {base}"
    ppl = {k: v[1]["ppl"] for k, v in exported.items()}
    print({"fp32": base, **ppl})
    assert ppl["bf16"] < base * 1.01
    assert ppl["int8"] < base * INT8_PPL_BOUND, (base, ppl)
    assert ppl["int4"] < base * INT4_PPL_BOUND, (base, ppl)
    assert ppl["int4-gptq"] < base * INT4_PPL_BOUND, (base, ppl)


def test_quantized_logits_move_by_the_expected_amount(trained, exported):
    """The quantized layers are really in the forward: logits change a little, int4 more than int8."""
    from largelm.model.gpt import split_tokens

    cfg, state, _, _ = trained
    tokens = _calibration(cfg)[0][:4]
    ids, _, pos = split_tokens(tokens)
    with single_rank_parallel_state():
        ref = fresh_model(cfg, state)(ids, pos, None)
        diff = {k: (load_quantized(exported[k][0])[0](ids, pos, None) - ref).abs().max().item()
                for k in ("int8", "int4")}
    assert 0 < diff["int8"] < diff["int4"] < 0.5 * ref.abs().max().item(), diff


def test_file_sizes_int4_lt_int8_lt_bf16(exported):
    size = {k: dir_bytes(v[0]) for k, v in exported.items()}
    assert size["int4"] < size["int8"] < size["bf16"], size
    meta = json.loads((exported["int4"][0] / "quant.json").read_text())
    assert meta["bits"] == 4 and meta["group_size"] == GROUP and len(meta["layers"]) == 4 * 2


def test_load_and_generate(trained, exported, tokenizer_path):
    from largelm.model.generate import generate
    from largelm.tokenizer import Tokenizer

    cfg = trained[0]
    tok = Tokenizer.load(tokenizer_path)
    with single_rank_parallel_state():
        model, loaded_cfg = load_quantized(exported["int4"][0])
        assert loaded_cfg.model == cfg.model
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 8
        a = generate(model, tok, "To be, or not to be", 12, context=cfg.model.seq_length)
        b = generate(model, tok, "To be, or not to be", 12, context=cfg.model.seq_length)
        sampled = generate(model, tok, "", 12, context=cfg.model.seq_length, temperature=0.8, top_k=20, seed=3)
        # bf16 compute: int8 layers run ATen's int8 kernel on weights read back from the file
        model16, _ = load_quantized(exported["int8"][0], torch.bfloat16)
        ppl16 = perplexity(model16, cfg, batch_size=16, max_batches=2)["ppl"]
        ppl32 = perplexity(load_quantized(exported["int8"][0])[0], cfg, batch_size=16, max_batches=2)["ppl"]
        text16 = generate(model16, tok, "To be", 4, context=cfg.model.seq_length)
    assert a == b and isinstance(a, str) and len(a) > 0
    assert abs(ppl16 / ppl32 - 1) < 0.02 and isinstance(text16, str), (ppl16, ppl32)
    assert isinstance(sampled, str)


def test_int8_forward_matches_dequantized_weights(trained):
    cfg, state, _, _ = trained
    with single_rank_parallel_state():
        model = fresh_model(cfg, state)
        quantize_model(model, QuantFormat(8))
        layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
        x = torch.randn(3, 5, layer.in_features)
        y, _ = layer(x)
        ref = torch.nn.functional.linear(x, layer.weight_dequantized(torch.float32))
        if layer.bias is not None and not layer.skip_bias_add:
            ref = ref + layer.bias
        # bf16 activations go through ATen's int8 weight-only kernel
        fast = QuantLinear(layer.quantized(), layer.bias, layer.skip_bias_add, torch.bfloat16)
        y16, _ = fast(x.to(torch.bfloat16))
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.02)


def test_refuses_unsupported(trained):
    cfg, state, _, _ = trained
    with single_rank_parallel_state():
        model = fresh_model(cfg, state)
        with pytest.raises(QuantizationError, match="in_features=64 is not divisible by group_size=128"):
            quantize_model(model, QuantFormat(4, 128))
        with pytest.raises(QuantizationError, match="calibration"):
            quantize_model(model, QuantFormat(8), "gptq")
    from largelm.quant.model import check_supported

    bert = cfg.model_copy(update={"model": cfg.model.model_copy(update={"arch": "bert"})})
    check_supported(bert)  # BERT is quantized too (tests/test_quant_hf.py)
    tp2 = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"tensor_parallel": 2})})
    with pytest.raises(QuantizationError, match="TP=1/PP=1"):
        check_supported(tp2)


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG (a real failed write, like a full disk)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_save_is_atomic(trained, tmp_path, monkeypatch):
    """A failed save leaves the previous output as it was; a good one replaces it as a whole; no temp dirs remain."""
    import errno

    from largelm.quant import model as quant_model

    cfg, state, _, _ = trained
    out = tmp_path / "q"
    with single_rank_parallel_state():
        int8, int4 = fresh_model(cfg, state), fresh_model(cfg, state)
        quantize_model(int8, QuantFormat(8))
        quantize_model(int4, QuantFormat(4, GROUP))
        save_quantized(int8, cfg, out, method="rtn", fmt=QuantFormat(8))
        assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors", "quant.json"]
        (out / "report.md").write_text("the int8 report")
        previous = {p.name: p.read_bytes() for p in out.iterdir()}
        with _file_size_limit(16 << 10), pytest.raises(Exception, match="File too large"):  # model.safetensors
            save_quantized(int4, cfg, out, method="rtn", fmt=QuantFormat(4, GROUP))
        assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
        assert [p.name for p in tmp_path.iterdir()] == ["q"]

        def disk_full(_cfg):  # the last file fails, after the new weights and quant.json were written
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as m, pytest.raises(OSError, match="No space left"):
            m.setattr(quant_model, "dump_config", disk_full)
            save_quantized(int4, cfg, out, method="rtn", fmt=QuantFormat(4, GROUP))
        assert {p.name: p.read_bytes() for p in out.iterdir()} == previous  # not int4 weights with int8 metadata
        assert [p.name for p in tmp_path.iterdir()] == ["q"]
        assert read_meta(out)["bits"] == 8 and load_quantized(out)[0] is not None

        save_quantized(int4, cfg, out, method="rtn", fmt=QuantFormat(4, GROUP))
        assert [p.name for p in tmp_path.iterdir()] == ["q"]
        assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors", "quant.json"]
        assert read_meta(out)["bits"] == 4 and load_quantized(out)[0] is not None

        other = tmp_path / "other"  # a directory that is not a quantized checkpoint is not replaced
        other.mkdir()
        (other / "notes.txt").write_text("keep me")
        with pytest.raises(QuantizationError, match=r"other holds files other than .*notes\.txt"):
            save_quantized(int4, cfg, other, method="rtn", fmt=QuantFormat(4, GROUP))
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


# --- the tool, on a real checkpoint --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def launcher_checkpoint(tokenizer_path, shard_dir, shard_seq_length, tmp_path_factory):
    """Root of a checkpoint written by the real launcher (2 bf16 steps: the tool reads a bf16 run's checkpoint;
    how well it trained does not matter here, and bf16 is slow on CPUs without AVX512_BF16)."""
    tmp = tmp_path_factory.mktemp("launched")
    config = tiny_config(tmp, tokenizer_path, shard_dir, shard_seq_length,
                         train={"steps": 2, "precision": "bf16", "micro_batch_size": 4, "grad_accum_steps": 1,
                                "eval_interval": 0, "log_interval": 1, "seed": 1})
    check_ok(launch(config, nproc=1))
    return tmp / "ckpt"


def _quantize_tool(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "quantize.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("option", ["--batch-size", "--calib-batches", "--group-size", "--eval-batches"])
def test_quantize_tool_refuses_a_zero_count(tmp_path, option):
    """Usage error naming the option (exit 2) before any checkpoint is read, not a ValueError traceback later."""
    proc = _quantize_tool("--checkpoint", tmp_path / "none", "--out", tmp_path / "out", option, "0")
    assert proc.returncode == 2 and f"argument {option}: must be >= 1, got 0" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_quantize_tool_on_launcher_checkpoint(launcher_checkpoint, tmp_path):
    out = tmp_path / "int4"
    proc = _quantize_tool("--checkpoint", launcher_checkpoint, "--out", out, "--bits", "4", "--group-size", "32",
                          "--method", "gptq", "--calib-batches", "2", "--eval-batches", "2", "--prompt", "The")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["bytes"]["quantized"] < report["bytes"]["bf16"]
    assert report["after"]["tokens_per_s"] > 0 and report["sample"]["continuation"] is not None
    assert "Quantization report" in (out / "report.md").read_text()
    bad = _quantize_tool("--checkpoint", launcher_checkpoint, "--out", tmp_path / "bad", "--bits", "4",
                         "--group-size", "48")
    assert bad.returncode == 2 and "not divisible by group_size=48" in bad.stderr


def _with_config(root, tmp_path, update):
    """A copy of checkpoint ``root`` whose config.yaml has ``update(raw)`` applied (manifest updated to match)."""
    import yaml

    from largelm.fileio import sha256_file

    step = next(shutil.copytree(root, tmp_path / "ckpt").glob("step_*"))
    cfg_file, manifest_file = step / "config.yaml", step / "manifest.json"
    raw = yaml.safe_load(cfg_file.read_text())
    update(raw)
    cfg_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    manifest = json.loads(manifest_file.read_text())
    manifest["files"]["config.yaml"] = {"sha256": sha256_file(cfg_file), "bytes": cfg_file.stat().st_size}
    manifest_file.write_text(json.dumps(manifest))
    return step


@pytest.mark.slow
def test_quantize_tool_names_the_missing_data_or_tokenizer(launcher_checkpoint, shard_dir, tmp_path):
    """config.yaml's data and tokenizer paths, relative to the training directory, do not resolve from another
    directory: a clean error naming the path (exit 2), not a traceback; the tokenizer is read only for --prompt."""
    def relative_paths(raw):
        raw["tokenizer"]["model"] = "tokenizer/tokenizer.model"
        for split in ("train", "valid"):
            raw["data"][split] = [{"path": f"shards/{split}"}]

    ckpt = _with_config(launcher_checkpoint, tmp_path, relative_paths)
    common = ("--checkpoint", ckpt, "--bits", "8", "--eval-batches", "1")
    no_data = _quantize_tool(*common, "--out", tmp_path / "a", cwd=tmp_path)
    assert no_data.returncode == 2 and "Traceback" not in no_data.stderr, no_data.stderr[-3000:]
    assert "error: shards/valid/manifest.json: no manifest" in no_data.stderr, no_data.stderr
    no_tok = _quantize_tool(*common, "--out", tmp_path / "b", "--prompt", "The", cwd=tmp_path)
    assert no_tok.returncode == 2 and "Traceback" not in no_tok.stderr, no_tok.stderr[-3000:]
    assert "error: tokenizer model tokenizer/tokenizer.model does not exist" in no_tok.stderr, no_tok.stderr

    (tmp_path / "shards").symlink_to(shard_dir)  # the data resolves, the tokenizer still does not: not needed
    ok = _quantize_tool(*common, "--out", tmp_path / "c", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads((tmp_path / "c" / "report.json").read_text())["sample"] is None

"""``train.precision: auto`` and an MFU that can be believed, on every kind of CPU.

* ``choose_precision`` on each capability, by faking the device probe: AVX2 (no native bf16) -> fp32, AVX512_BF16 /
  AMX / CUDA sm_80+ -> bf16; explicit choices are kept (bf16 without native support flagged slow); a resume under
  ``auto`` keeps its checkpoint's precision and says what a fresh run would use.
* the probe on the machine at hand agrees with the CPU's flags, and ``ONEDNN_MAX_CPU_ISA=AVX2`` (the AVX2 emulation
  .ci/run uses) turns native bf16 off.
* real runs through the launcher under AVX2 emulation: explicit bf16 (the case that printed "mfu 364%") now shows
  an MFU below 100% and a warning with the measured slow-down; a resume with ``auto`` keeps the checkpoint's bf16
  and says so; the checkpoint records the precision it was trained in.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from train_utils import check_ok, launch, tiny_config

from largelm.config import load_config
from largelm.hardware import DeviceInfo, choose_precision, detect_device, run_precision
from largelm.model.flops import matmul_parameter_count, matmul_shapes

AVX2 = DeviceInfo("cpu", "fake EPYC", "AVX2", False, "no AVX512_BF16 or AMX: bf16 matmuls are emulated")
AVX512_BF16 = DeviceInfo("cpu", "fake Xeon", "AVX512", True, "AVX512_BF16/AMX_BF16")
H100 = DeviceInfo("cuda", "fake H100", "sm_90", True, "bf16 tensor cores")
V100 = DeviceInfo("cuda", "fake V100", "sm_70", False, "no bf16 tensor cores (compute capability < 8.0)")
EMULATE_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
MFU = re.compile(r"^step \d+/\d+ .* (fp32|bf16) mfu ([0-9.]+)%", re.MULTILINE)


@pytest.mark.parametrize("device,expected", [(AVX2, "fp32"), (AVX512_BF16, "bf16"), (H100, "bf16"), (V100, "fp32")])
def test_auto_picks_bf16_only_where_it_is_native(device, expected):
    choice = choose_precision("auto", device)
    assert choice.precision == expected and not choice.slow_bf16
    assert f"chose {expected}" in choice.reason and device.capability in choice.reason


def test_explicit_precision_is_kept_and_slow_bf16_flagged():
    assert choose_precision("bf16", AVX2).slow_bf16  # runs, with the trainer's measured warning
    assert not choose_precision("bf16", AVX512_BF16).slow_bf16
    assert choose_precision("fp32", AVX512_BF16).precision == "fp32"


def test_resume_under_auto_keeps_the_checkpoints_precision_and_says_so():
    kept = choose_precision("auto", AVX2, checkpoint_precision="bf16")  # bf16 run continued on an AVX2 machine
    assert kept.precision == "bf16" and kept.slow_bf16
    assert "resumes a bf16 checkpoint in bf16" in kept.reason and "a fresh run here would use fp32" in kept.reason
    same = choose_precision("auto", AVX512_BF16, checkpoint_precision="bf16")
    assert same.precision == "bf16" and "fresh run" not in same.reason
    switched = choose_precision("fp32", AVX512_BF16, checkpoint_precision="bf16")  # the user's explicit decision
    assert switched.precision == "fp32" and "numerics change from bf16 to fp32" in switched.reason


def test_probe_on_this_machine_follows_the_cpu_flags():
    device = detect_device()
    assert device.capability == torch.backends.cpu.get_cpu_capability()
    caps = torch.cpu.get_capabilities()
    has_flags = bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    if not os.environ.get("ONEDNN_MAX_CPU_ISA"):
        assert device.native_bf16 == has_flags, device
    assert run_precision(load_config("configs/gpt-tiny.yaml")) == ("bf16" if device.native_bf16 else "fp32")


def test_onednn_isa_limit_turns_native_bf16_off():
    """The AVX2 emulation .ci/run uses: oneDNN's bf16 path is the slow one, so auto must not pick bf16."""
    code = "from largelm.hardware import detect_device as d; x = d(); print(x.native_bf16, x.capability)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **EMULATE_AVX2), capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "AVX2"]


@pytest.mark.parametrize("style,tp", [("gpt2", 1), ("gpt2", 2), ("llama", 1), ("llama", 2)])
def test_mfu_products_are_the_models_matmuls(style, tp):
    """The products the MFU peak is measured on carry exactly the FLOPs the MFU numerator counts for linears:
    2 x tokens x matmul parameters, split evenly by tensor parallelism."""
    cfg = load_config("configs/gpt-tiny.yaml", [f"model.style={style}", "model.vocab_size=4096"])
    tokens = cfg.train.micro_batch_size * cfg.model.seq_length
    *layer, logits = matmul_shapes(cfg.model, tokens, tp)  # one layer's four linears, then the logit projection
    assert len(layer) == 4 and all(m == tokens for m, _, _ in (*layer, logits))
    per_rank = cfg.model.num_layers * sum(m * k * n for m, k, n in layer) + logits[0] * logits[1] * logits[2]
    assert per_rank * tp == tokens * matmul_parameter_count(cfg.model)


@pytest.mark.slow
def test_bf16_on_avx2_mfu_below_100_percent_and_auto_resume_keeps_bf16(tmp_path, tokenizer_path, shard_dir,
                                                                          shard_seq_length):
    """gpt-tiny's shape in bf16 on 2 ranks under AVX2 emulation: the run that printed "mfu 364%" (its peak was one
    square n=1024 bf16 matmul, where AVX2 is slowest). Then a resume with ``auto`` on the same machine keeps bf16."""
    model = {"num_layers": 4, "hidden_size": 128, "num_attention_heads": 4}
    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length, model=model,
                         train={"steps": 3, "precision": "bf16", "micro_batch_size": 8, "grad_accum_steps": 2,
                                "log_interval": 1},
                         optimizer={"warmup_steps": 1}, logging={"peak_tflops_per_rank": None})
    out = check_ok(launch(config, nproc=2, env=EMULATE_AVX2))
    assert "precision: train.precision=bf16 (explicit)" in out
    assert re.search(r"warning: bf16 is not native on this device: .* take [0-9.,]+x as long in bf16", out), out[-3000:]
    mfus = [(p, float(m)) for p, m in MFU.findall(out)]
    assert len(mfus) == 3 and all(p == "bf16" and 0 < m < 100 for p, m in mfus), mfus
    step = tmp_path / "ckpt" / "step_00000003"
    assert json.loads((step / "manifest.json").read_text())["precision"] == "bf16"
    assert "precision: bf16" in (step / "config.yaml").read_text()  # what ran, not "auto"

    out = check_ok(launch(config, nproc=2, env=EMULATE_AVX2, overrides=("train.precision=auto", "train.steps=4")))
    assert "train.precision=auto resumes a bf16 checkpoint in bf16" in out and "a fresh run here would use fp32" in out
    assert "warning: bf16 is not native" in out
    assert [p for p, _ in MFU.findall(out)] == ["bf16"]


@pytest.mark.slow
def test_auto_on_avx2_trains_in_fp32_with_a_sane_mfu(tmp_path, tokenizer_path, shard_dir, shard_seq_length):
    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length,
                         train={"steps": 3, "precision": "auto", "log_interval": 1}, optimizer={"warmup_steps": 1},
                         logging={"peak_tflops_per_rank": None})
    out = check_ok(launch(config, nproc=1, env=EMULATE_AVX2))
    assert "train.precision=auto chose fp32 on cpu" in out and "(AVX2;" in out
    assert "warning: bf16" not in out
    mfus = [(p, float(m)) for p, m in MFU.findall(out)]
    assert len(mfus) == 3 and all(p == "fp32" and 0 < m < 100 for p, m in mfus), mfus


def test_measuring_the_peak_leaves_the_global_rng_alone():
    """The trainer measures after restoring a checkpoint's RNG state: drawing from it would break exact resume."""
    from largelm.train.metrics import matmul_flops

    before = torch.get_rng_state()
    rates = matmul_flops([(64, 32, 48)], torch.float32, seconds_per_product=0.001)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(rates) == {("forward", 64, 32, 48), ("input_grad", 64, 32, 48), ("weight_grad", 64, 32, 48)}

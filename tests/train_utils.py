"""Helpers for tests that run real training jobs through the launcher (real processes, gloo, DeepSpeed)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from largelm.config import config_from_dict

REPO = Path(__file__).resolve().parent.parent
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss ([0-9.naninf+-]+)", re.MULTILINE)


def tiny_config(tmp: Path, tokenizer_path: Path, shard_dir: Path, seq_length: int, **sections) -> Path:
    """A tiny GPT config on the test shards, written to ``tmp/config.yaml``. ``sections`` update sections."""
    cfg = {
        "name": "test",
        "model": {"style": "gpt2", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                  "seq_length": seq_length, "make_vocab_size_divisible_by": 64},
        "tokenizer": {"model": str(tokenizer_path)},
        "data": {"train": [{"path": str(shard_dir / "train")}], "valid": [{"path": str(shard_dir / "valid")}],
                 "num_workers": 1, "shuffle_buffer": 64, "seed": 7},
        "parallel": {"zero_stage": 2},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "weight_decay": 0.1, "grad_clip": 1.0},
        "train": {"steps": 8, "micro_batch_size": 4, "grad_accum_steps": 2, "precision": "fp32", "seed": 11,
                  "eval_interval": 0, "eval_steps": 2, "log_interval": 1},
        # a test's save takes well under a second: a peer frozen or cut off mid-save ends the run within a minute
        "checkpoint": {"dir": str(tmp / "ckpt"), "save_interval": 0, "keep_last": 2, "save_timeout_s": 60},
        # a datasheet-style MFU peak: no start-up matmul measurement (tests of the measured peak set None)
        "logging": {"tensorboard_dir": str(tmp / "tb"), "progress_bar": False, "peak_tflops_per_rank": 1.0},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, nproc: int = 2, overrides: tuple = (), launcher: str = "deepspeed",
           timeout: int = 600, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run ``largelm-launch`` (the real launcher) and return the completed process (stdout+stderr merged).
    ``env``: extra environment variables for the launcher and its ranks."""
    cmd = [sys.executable, "-m", "largelm.launch", "--config", str(config), "--nproc", str(nproc),
           "--launcher", launcher, "--master-port", str(free_port())]
    cmd += ["--", *overrides] if overrides else []
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def losses(output: str) -> dict[int, float]:
    """step -> loss from the rank-0 step lines."""
    return {int(m.group(1)): float(m.group(3)) for m in STEP_LINE.finditer(output)}


def check_ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"training failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}"
    return proc.stdout


def config_object(**sections):
    """A validated tiny GPT ``Config`` (no files behind it: for code that only reads the config). ``sections``
    update sections."""
    raw = {
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 200},
        "tokenizer": {"model": "unused.model"},
        "data": {"train": [{"path": "unused"}]},
        "train": {"steps": 4, "micro_batch_size": 2, "grad_accum_steps": 2, "precision": "fp32"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)

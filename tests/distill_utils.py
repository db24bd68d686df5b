"""Helpers shared by the sharded-distillation tests (tests/test_distill_sharded.py, tests/test_distill_pipeline.py):
random full GPT weights large enough that every tensor matters, teacher checkpoints written in given layouts by a
real engine, and a run of tools/distill.py."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from train_utils import REPO, check_ok, free_port

from largelm.config import config_from_dict

VOCAB = 1000  # the test tokenizer's; padded to 1024 at TP=1 and TP=2 (make_vocab_size_divisible_by 64)


def random_gpt_state(model_cfg, seed: int) -> dict[str, torch.Tensor]:
    """Full TP=1 weights, N(0, 0.2^2) (norm gains 1 + that), vocabulary rows padded with zeros to the TP=2 padding:
    large enough that every tensor matters for the logits (megatron's 0.02 init gives near-uniform ones)."""
    from largelm.model.layout import gpt_param_shapes  # lazy (model code: imported where a test builds weights)

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in gpt_param_shapes(model_cfg, vocab_rows=model_cfg.padded_vocab_size(2)).items():
        value = torch.randn(shape, generator=g) * 0.2
        if "layernorm.weight" in name:
            value += 1.0
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            value[VOCAB:] = 0.0
        state[name] = value
    return state


def write_teachers(rank, world_size, raw, root, state, layouts: dict[str, tuple[int, int]]):
    """Save ``state`` as a training checkpoint ``root/<layout>`` of each (tensor, pipeline parallel) layout in
    ``layouts`` (a real engine, ZeRO-1). Runs on every rank (``mp_utils.run_ranks``)."""
    from megatron.core import parallel_state  # lazy (these run in the spawned ranks)

    from largelm.checkpoint.manager import CheckpointManager
    from largelm.config import dump_config
    from largelm.parallel import groups
    from largelm.train.step import build_step

    groups.init_distributed()
    try:
        for layout, (tp, pp) in layouts.items():
            groups.init_model_parallel(tp, pp)
            cfg = config_from_dict({**raw, "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp,
                                                        "zero_stage": 1}})
            step = build_step(cfg, world_size, init_state_dict=state)
            meta = {"world_size": world_size, "tensor_parallel": tp, "pipeline_parallel": pp, "zero_stage": 1}
            CheckpointManager(f"{root}/{layout}", config_yaml=dump_config(cfg), meta=meta).save(step.engine, 1, {})
            del step
            parallel_state.destroy_model_parallel()
    finally:
        groups.destroy()


def run_distill_tool(config, teacher, *args: str, overrides: tuple = (), nproc: int = 2, timeout: float = 600) -> str:
    """``tools/distill.py --config config --teacher teacher *args --nproc nproc -- *overrides`` on CPU ranks; its
    output, after checking it succeeded (train_utils.check_ok)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "distill.py"), "--config", str(config), "--teacher", str(teacher),
         *args, "--nproc", str(nproc), "--master-port", str(free_port()), *(("--", *overrides) if overrides else ())],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
        env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return check_ok(proc)

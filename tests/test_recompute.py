"""Activation recompute (``train.activation_checkpointing``): with dropout on, "selective" and "full" train exactly
like "none" (same losses and gradient norms, bit for bit: megatron's checkpoint restores the RNG streams, so the
recomputed forward draws the same dropout masks), for GPT and BERT, dense (DP=2) and pipeline (PP=2) step drivers,
on 2 spawned gloo ranks. Also checks that recompute really happens (the layers' forward runs again in backward)."""

from __future__ import annotations

import pytest
import torch
from mp_utils import run_ranks
from test_bert import TINY as BERT_TINY
from test_bert import make_batch

STEPS, GRAD_ACCUM, MICRO = 2, 2, 2
MODES = ("none", "selective", "full")
LAYOUTS = {  # name -> (arch, parallel section)
    "gpt-dp2": ("gpt", {"zero_stage": 1}),
    "gpt-pp2": ("gpt", {"pipeline_parallel": 2, "zero_stage": 1}),
    "bert-dp2": ("bert", {"zero_stage": 2}),
    "bert-pp2": ("bert", {"pipeline_parallel": 2, "zero_stage": 1}),
}
DROPOUT = {"hidden_dropout": 0.1, "attention_dropout": 0.1}


def _config(arch: str, parallel: dict, mode: str):
    from largelm.config import config_from_dict

    model = (dict(BERT_TINY, num_layers=2, make_vocab_size_divisible_by=64, **DROPOUT) if arch == "bert" else
             dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=200,
                  make_vocab_size_divisible_by=64, **DROPOUT))
    return config_from_dict({
        "model": model, "tokenizer": {"model": "unused.model"}, "data": {"train": [{"path": "unused"}]},
        "parallel": parallel,
        "optimizer": {"lr": 3e-3, "min_lr": 0.0, "warmup_steps": 0, "decay_style": "constant", "grad_clip": 1.0},
        "train": {"steps": STEPS, "micro_batch_size": MICRO, "grad_accum_steps": GRAD_ACCUM, "precision": "fp32",
                  "seed": 5, "activation_checkpointing": mode},
    }, source=f"{arch} {mode}")


def _batches(arch: str, rank: int) -> list[dict]:
    if arch == "bert":
        return [make_batch(b=MICRO, seed=100 * rank + i) for i in range(STEPS * GRAD_ACCUM)]
    g = torch.Generator().manual_seed(rank)
    return [{"tokens": torch.randint(0, 200, (MICRO, 17), generator=g)} for _ in range(STEPS * GRAD_ACCUM)]


def _run(rank: int, world_size: int, names: list) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from largelm.parallel import groups
    from largelm.parallel.cpu_compat import model_parallel_manual_seed
    from largelm.train.step import build_step

    calls = {"n": 0}
    original = TransformerLayer.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    TransformerLayer.forward = counted
    groups.init_distributed()
    out = {}
    try:
        for name in names:
            arch, parallel = LAYOUTS[name]
            for mode in MODES:
                cfg = _config(arch, parallel, mode)
                groups.init_model_parallel(1, cfg.parallel.pipeline_parallel)
                torch.manual_seed(5)
                model_parallel_manual_seed(5)
                step = build_step(cfg, world_size)
                batches = _batches(arch, parallel_state.get_data_parallel_rank())
                calls["n"] = 0
                losses, norms = [], []
                for s in range(STEPS):
                    losses.append(float(step.train_step(iter(batches[s * GRAD_ACCUM:(s + 1) * GRAD_ACCUM]))))
                    norms.append(float(step.engine.get_global_grad_norm()))
                out[(name, mode)] = {"losses": losses, "norms": norms, "layer_forwards": calls["n"]}
                del step
                dist.barrier()
                parallel_state.destroy_model_parallel()
    finally:
        TransformerLayer.forward = original
        groups.destroy()
    return out


@pytest.mark.slow
@pytest.mark.numerics  # bit-identical on every CPU: the same kernels on the same inputs
def test_recompute_trains_exactly_like_no_recompute():
    results = run_ranks(_run, 2, list(LAYOUTS), timeout_s=600)
    for rank, res in enumerate(results):
        for name in LAYOUTS:
            base = res[(name, "none")]
            assert base["layer_forwards"] > 0
            for mode in ("selective", "full"):
                got = res[(name, mode)]
                where = f"rank {rank} {name} {mode}"
                assert got["losses"] == base["losses"], f"{where}: {got['losses']} vs {base['losses']}"
                assert got["norms"] == base["norms"], f"rank {rank} {name} {mode}: {got['norms']} vs {base['norms']}"
            # full recompute runs every layer's forward a second time in backward; selective only core attention
            assert res[(name, "full")]["layer_forwards"] == 2 * base["layer_forwards"], (rank, name)
            assert res[(name, "selective")]["layer_forwards"] == base["layer_forwards"], (rank, name)

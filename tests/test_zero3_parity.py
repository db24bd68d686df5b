"""ZeRO-3 trains exactly like ZeRO-0 and ZeRO-2 on 2 data-parallel gloo ranks: BERT (tied MLM head, pooler, binary
head) and GPT, fp32, dropout on.

A side check once reported a different *first-step* BERT loss at ZeRO-3 than at ZeRO-2 (8.72 vs 9.08). The first
step's loss is computed before any optimizer update, so with the same weights, batches and dropout RNG it may differ
only by fp32 summation order. This pins that down through the real step driver (``largelm.train.step.build_step``:
``DenseStep`` in a DeepSpeed engine, real megatron-core models, spawned gloo ranks), per ZeRO stage 0/2/3:

* the starting weights the engine holds (ZeRO-3: gathered from the partitions) are bit-identical to ZeRO-0's, both
  from full weights (``init_state_dict``) and from the seeded random initialisation the trainer uses;
* the model is big enough that ZeRO-3 really partitions the tensors in question: the tied word embedding (read by
  the embedding *and* the MLM output layer), the LM head's dense layer and the pooler exceed DeepSpeed's
  ``param_persistence_threshold`` (1e5 elements; smaller tensors - norms, biases, the binary head - are kept whole on
  every rank, which is also checked as covered by the comparison of losses);
* the loss the trainer logs (DP mean of each replica's mean over micro-batches) and DeepSpeed's global gradient norm
  after each of 2 optimizer steps equal ZeRO-0's within ``sum_rtol`` of one step's reduction chain
  (tests/tolerances.py; the stages differ in summation order only: ZeRO-2/3 reduce-scatter gradients into
  partitions and sum the norm over them). Dropout (0.1 hidden and attention) stays on: the masks come from the
  default CPU generator and megatron's RNG tracker streams, which ``model_parallel_manual_seed`` seeds (as the
  trainer does) identically for every stage, and ZeRO-3's parameter gathering draws no random numbers, so the stages
  draw the same masks. Seeding the ZeRO-3 run with seed + 1 instead moves its step-1 loss by 0.04 (BERT) to 0.12
  (GPT), measured, and fails this test.

Measured (x86 CPU, fp32): step-1 losses bit-identical in all three stages; ZeRO-2 and ZeRO-3 gradient norms agree
to ~1e-7 relative. ZeRO-0's norm is 2.8e-6 to 5e-6 lower than theirs, always in the same direction: largelm's
``zero0_grad_norm`` patch takes it from DeepSpeed's ``clip_grad_norm_``, which sums ``p.grad.float().norm()`` in
fp32, and torch's fp32 CPU norm is biased low by a length-dependent amount (-3e-6 relative at 4e5 elements, -8e-5 at
4e6; DeepSpeed's ZeRO-1/2/3 accumulate the norm in float64). At these sizes that stays inside ``RTOL``.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from mp_utils import assert_steps_match, randomize, run_ranks, single_rank_parallel_state, weights_of
from test_bert import make_batch
from tolerances import chain_length, sum_rtol

# hidden 320 / vocab 400 (padded to 512): word embedding 164k, lm_head.dense and pooler 102k, fc1/fc2 410k elements,
# all above DeepSpeed's 1e5-element persistence threshold, so ZeRO-3 partitions them
HIDDEN, FFN, LAYERS, HEADS, SEQ, VOCAB, PADDED = 320, 1280, 2, 4, 32, 400, 512
GLOBAL_MICRO, GRAD_ACCUM, STEPS, DROPOUT = 4, 2, 2, 0.1
STAGES = (0, 2, 3)
PARTITIONED = {
    "bert": ("embedding.word_embeddings.weight", "lm_head.dense.weight", "pooler.dense.weight"),
    "gpt": ("embedding.word_embeddings.weight", "decoder.layers.0.mlp.linear_fc1.weight"),
}
# name -> (arch, start from full weights: True, or from the seeded random initialisation: False)
CASES = {"bert": ("bert", True), "bert-random-init": ("bert", False), "gpt": ("gpt", True)}
# one optimizer step's reduction chain (forward and backward, BERT's LM head adds a dense layer and a norm)
STEP_CHAIN = chain_length(layers=LAYERS, hidden=HIDDEN, ffn=FFN, seq=SEQ, heads=HEADS, vocab=PADDED,
                          tokens=GLOBAL_MICRO * GRAD_ACCUM * SEQ, extra=2 * HIDDEN, backward=True)
RTOL = sum_rtol(STEP_CHAIN)  # ~1.9e-5


def case_config(arch: str, zero: int):
    from largelm.config import config_from_dict

    return config_from_dict({
        "model": {"arch": arch, "style": "gpt2", "num_layers": LAYERS, "hidden_size": HIDDEN,
                  "num_attention_heads": HEADS, "seq_length": SEQ, "vocab_size": VOCAB,
                  "hidden_dropout": DROPOUT, "attention_dropout": DROPOUT},
        "tokenizer": {"model": "unused.model"},  # explicit batches: no tokenizer or shards are read
        "data": {"train": [{"path": "unused"}]},
        "parallel": {"zero_stage": zero},
        "optimizer": {"lr": 3e-3, "min_lr": 0.0, "warmup_steps": 0, "decay_style": "constant",
                      "weight_decay": 0.1, "grad_clip": 1.0},
        "train": {"steps": STEPS, "micro_batch_size": GLOBAL_MICRO // 2, "grad_accum_steps": GRAD_ACCUM,
                  "precision": "fp32", "seed": 5},
    }, source=f"{arch} ZeRO-{zero}")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()


def _start_weights(engine) -> tuple[dict[str, str], list[str]]:
    """(name -> digest of the engine's full starting weight, names of the parameters ZeRO-3 partitioned)."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    partitioned = [n for n, p in params.items()
                   if hasattr(p, "ds_tensor") and not p.ds_persist and p.ds_tensor.numel() < p.ds_numel]
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=bool(partitioned)):
        digests = {n: _digest(p) for n, p in params.items()}
    return digests, partitioned


def _run_cases(rank: int, world_size: int, weights: dict, batches: dict) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from largelm.parallel import groups
    from largelm.parallel.cpu_compat import model_parallel_manual_seed
    from largelm.train.step import build_step

    groups.init_distributed()  # launcher-style environment from run_ranks
    out = {}
    per_rank = GLOBAL_MICRO // world_size
    try:
        for name, (arch, from_weights) in CASES.items():
            for zero in STAGES:
                cfg = case_config(arch, zero)
                groups.init_model_parallel(1, 1)
                torch.manual_seed(cfg.train.seed)  # what the trainer seeds before building the step
                model_parallel_manual_seed(cfg.train.seed)
                step = build_step(cfg, world_size, init_state_dict=weights[arch] if from_weights else None)
                digests, partitioned = _start_weights(step.engine)
                losses, norms = [], []
                for s in range(STEPS):
                    micro = [{k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batches[arch][s][k].items()}
                             for k in range(GRAD_ACCUM)]
                    loss = step.train_step(iter(micro)).detach().float()
                    dist.all_reduce(loss)  # what Trainer._dp_mean logs
                    losses.append(loss.item() / world_size)
                    norms.append(float(step.engine.get_global_grad_norm()))
                out[(name, zero)] = dict(losses=losses, norms=norms, digests=digests, partitioned=partitioned)
                del step
                parallel_state.destroy_model_parallel()
    finally:
        groups.destroy()
    return out


def _full_weights(arch: str) -> dict:
    """Full (TP=1) starting weights, with noise larger than init scale: logits far from uniform, so every tensor
    (heads included) moves the loss."""
    from largelm.model.registry import get_arch
    from largelm.parallel.cpu_compat import model_parallel_manual_seed

    cfg = case_config(arch, 0)
    model_parallel_manual_seed(3)
    spec = get_arch(arch)
    model = spec.build_model(cfg.model, cfg.parallel, *spec.section_args(cfg), dtype=torch.float32)
    return weights_of(randomize(model, seed=4, std=0.05))


@pytest.fixture(scope="module")
def runs():
    with single_rank_parallel_state():
        weights = {arch: _full_weights(arch) for arch in ("bert", "gpt")}
    g = torch.Generator().manual_seed(0)
    batches = {
        # masked sentence pairs (BertMasker); the GPT batches: random tokens
        "bert": [[make_batch(GLOBAL_MICRO, seed=10 * s + k) for k in range(GRAD_ACCUM)] for s in range(STEPS)],
        "gpt": [[{"tokens": torch.randint(0, VOCAB, (GLOBAL_MICRO, SEQ + 1), generator=g)}
                 for _ in range(GRAD_ACCUM)] for _ in range(STEPS)],
    }
    per_rank = run_ranks(_run_cases, 2, weights, batches, timeout_s=600)
    for (name, zero), res in per_rank[0].items():
        print(f"  {name:17s} ZeRO-{zero}: losses {res['losses']} norms {res['norms']}")
    return per_rank


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("name", list(CASES))
def test_zero3_starts_from_the_same_weights_and_partitions_them(runs, name):
    arch = CASES[name][0]
    for rank, res in enumerate(runs):
        zero3 = res[(name, 3)]
        missing = [p for p in PARTITIONED[arch] if p not in zero3["partitioned"]]
        assert not missing, f"rank {rank}: ZeRO-3 did not partition {missing}: the test would not exercise it"
        assert all(not res[(name, z)]["partitioned"] for z in (0, 2))
        for zero in (2, 3):
            differ = [n for n, d in res[(name, zero)]["digests"].items() if d != res[(name, 0)]["digests"][n]]
            assert not differ, f"{name} rank {rank}: ZeRO-{zero} starts from other weights than ZeRO-0: {differ}"


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("zero", [2, 3])
def test_zero_stage_trains_like_zero0(runs, name, zero):
    assert_steps_match(f"{name} ZeRO-{zero}", [res[(name, zero)] for res in runs], runs[0][(name, 0)], STEPS,
                       RTOL, RTOL, ref_name="ZeRO-0")

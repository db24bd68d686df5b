"""3D parallelism parity on CPU/gloo: every layout trains exactly like one rank.

Each layout runs the real step driver (``largelm.train.step.build_step``: ``DenseStep`` for PP=1,
``PipelineStep`` = DeepSpeed's PipelineEngine over megatron-core layers for PP>1) in spawned gloo ranks, from
the same full initial weights (``load_full_state_dict`` cuts each rank's shard) and the same global batches
(explicit tensors: with DP=2 each data-parallel rank gets half of every reference micro-batch, so a reference
micro-batch of 4 samples is the union of the two DP ranks' micro-batches of 2). The reference is one rank
(TP=PP=DP=1). Compared after each of 3 optimizer steps: the loss the trainer logs (this replica's mean over
micro-batches, averaged over DP) on every rank, and DeepSpeed's global gradient norm (pre-clipping; the
gradients are clipped to 1.0, so a wrong norm would also change the next losses).

Tolerances (tests/tolerances.py, error models): fp32 loss and gradient norm relative ``sum_rtol`` of one step's
reduction chain (forward and backward over 4 layers, the 1024-way softmax and 256 tokens: 3.2e-5), since the
layouts differ in summation order only (TP splits matmuls and the vocab-parallel softmax, DP and PP the sums over
micro-batches and ranks). Measured worst case over all layouts and steps: 2.3e-7 (loss) and 4.7e-7 (norm); a
layout bug (a missing all-reduce, a wrong DP average) moves them by 1e-3 and more. bf16 TP=2xPP=2: the loss must
fall over 6 steps and stay within one bf16 rounding (u_bf16 = 2^-8 relative, ~0.027) of the fp32 TP=2xPP=2 run's
loss at every step (measured at most 0.0011).

Layouts (world size): TP=2 (2), PP=2 (2), TP=2+SP (2), TP=2xPP=2 (4), DP=2xTP=2 (4, ZeRO-2), DP=2xPP=2 (4),
TP=2xPP=2+SP (4, llama-style untied GQA), PP=2 llama; pipeline layouts use ZeRO-1 (DeepSpeed's pipeline engine
allows only 0/1). The gpt2-style model ties its embeddings, so the PP layouts also check that the first stage's
word embedding and the last stage's output weight are still bit-identical after training.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from mp_utils import assert_steps_match, randomize, rel_diff, run_ranks, single_rank_parallel_state, weights_of
from tolerances import UBF16, chain_length, sum_rtol

VOCAB = 1000  # padded to 1024 under TP=1 (x64) and TP=2 (x128): the same shapes in every layout
MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=VOCAB,
             make_vocab_size_divisible_by=64)
GLOBAL_MICRO = 4  # samples per reference micro-batch
GRAD_ACCUM = 2
# one optimizer step's reduction chain (ffn 4 x 64 for gpt2, 256 for llama too), forward and backward
STEP_CHAIN = chain_length(layers=4, hidden=64, ffn=256, seq=32, heads=4, vocab=1024,
                          tokens=GLOBAL_MICRO * GRAD_ACCUM * 32, backward=True)
LOSS_RTOL = NORM_RTOL = sum_rtol(STEP_CHAIN)  # the layouts differ in summation order only
BF16_LOSS_RTOL = UBF16  # bf16 vs fp32 loss: one bf16 rounding
STYLES = {
    "gpt2": dict(style="gpt2", tie_embeddings=True),
    "llama": dict(style="llama", num_query_groups=2, tie_embeddings=False),
}
STEPS = 3
LONG_STEPS = 6  # bf16 vs fp32 comparison

# name -> layout. "ranks" is the world size; DP = ranks / (tp * pp).
LAYOUTS = {
    "ref": dict(ranks=1, tp=1, pp=1),
    "ref-llama": dict(ranks=1, tp=1, pp=1, style="llama"),
    "tp2": dict(ranks=2, tp=2, pp=1),
    "pp2": dict(ranks=2, tp=1, pp=2),
    "tp2-sp": dict(ranks=2, tp=2, pp=1, sp=True),
    "pp2-llama": dict(ranks=2, tp=1, pp=2, style="llama"),
    "tp2xpp2": dict(ranks=4, tp=2, pp=2, steps=LONG_STEPS),
    "dp2xtp2": dict(ranks=4, tp=2, pp=1, zero=2),
    "dp2xpp2": dict(ranks=4, tp=1, pp=2),
    "tp2xpp2-sp-llama": dict(ranks=4, tp=2, pp=2, sp=True, style="llama"),
    "tp2xpp2-bf16": dict(ranks=4, tp=2, pp=2, precision="bf16", steps=LONG_STEPS),
}
PARITY = ["tp2", "pp2", "tp2-sp", "pp2-llama", "tp2xpp2", "dp2xtp2", "dp2xpp2", "tp2xpp2-sp-llama"]


def layout_config(layout: dict):
    from largelm.config import config_from_dict

    dp = layout["ranks"] // (layout["tp"] * layout["pp"])
    return config_from_dict({
        "model": dict(MODEL, **STYLES[layout.get("style", "gpt2")]),
        "tokenizer": {"model": "unused.model"},  # explicit batches: no tokenizer or shards are read
        "data": {"train": [{"path": "unused"}]},
        "parallel": {"tensor_parallel": layout["tp"], "pipeline_parallel": layout["pp"],
                     "sequence_parallel": layout.get("sp", False), "zero_stage": layout.get("zero", 1)},
        "optimizer": {"lr": 3e-3, "min_lr": 0.0, "warmup_steps": 0, "decay_style": "constant",
                      "weight_decay": 0.1, "grad_clip": 1.0},
        "train": {"steps": layout.get("steps", STEPS), "micro_batch_size": GLOBAL_MICRO // dp,
                  "grad_accum_steps": GRAD_ACCUM, "precision": layout.get("precision", "fp32"), "seed": 5},
    }, source=f"layout {layout}")


def _tied_copies_diff(step) -> float | None:
    """Max |first-stage word embedding - last-stage output weight| (0.0 = in sync); None if not tied/pipelined."""
    import torch.distributed as dist

    from largelm.model.pipeline import TIED_ATTR, TIED_KEY

    module = getattr(step.engine, "module", None)
    comms = getattr(module, "tied_comms", {})
    if TIED_KEY not in comms:
        return None
    comm = comms[TIED_KEY]
    weight = getattr(module.tied_modules[TIED_KEY], TIED_ATTR).detach()
    first = weight.clone()
    dist.broadcast(first, src=min(comm["ranks"]), group=comm["group"])
    return (first.float() - weight.float()).abs().max().item()


def _run_layouts(rank: int, world_size: int, names: list[str], weights: dict, tokens: torch.Tensor) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from largelm.parallel import groups
    from largelm.parallel.cpu_compat import model_parallel_manual_seed
    from largelm.train.step import build_step

    groups.init_distributed()  # launcher-style environment from run_ranks
    out = {}
    try:
        for name in names:
            layout = LAYOUTS[name]
            cfg = layout_config(layout)
            groups.init_model_parallel(layout["tp"], layout["pp"])
            torch.manual_seed(cfg.train.seed)
            model_parallel_manual_seed(cfg.train.seed)
            start = time.perf_counter()
            step = build_step(cfg, world_size, init_state_dict=weights[layout.get("style", "gpt2")])
            build_s = time.perf_counter() - start
            dp_rank = parallel_state.get_data_parallel_rank()
            dp = parallel_state.get_data_parallel_world_size()
            per_rank = GLOBAL_MICRO // dp
            losses, norms, times = [], [], []
            for s in range(cfg.train.steps):
                micro = [{"tokens": tokens[s, k * GLOBAL_MICRO + dp_rank * per_rank:][:per_rank]}
                         for k in range(GRAD_ACCUM)]
                start = time.perf_counter()
                loss = step.train_step(iter(micro)).detach().float()
                times.append(time.perf_counter() - start)
                # what Trainer._dp_mean logs
                dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
                losses.append(loss.item() / dp)
                norms.append(float(step.engine.get_global_grad_norm()))
            out[name] = dict(losses=losses, norms=norms, tied_diff=_tied_copies_diff(step), build_s=build_s,
                             step_s=times, dp_rank=dp_rank)
            del step
            parallel_state.destroy_model_parallel()
    finally:
        groups.destroy()
    return out


def _markov_tokens(steps: int, samples: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Learnable text-like data: a random sparse Markov chain over 64 token ids spread over the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(VOCAB, generator=g)[:64]
    successors = torch.randint(0, 64, (64, 3), generator=g)
    state = torch.randint(0, 64, (steps, samples), generator=g)
    out = torch.empty(steps, samples, seq + 1, dtype=torch.long)
    for t in range(seq + 1):
        out[:, :, t] = ids[state]
        state = successors[state, torch.randint(0, 3, state.shape, generator=g)]
    return out


def _initial_weights(style: str) -> dict:
    from largelm.config import ModelConfig, ParallelConfig
    from largelm.model.gpt import build_gpt_model
    from largelm.parallel.cpu_compat import model_parallel_manual_seed

    model_parallel_manual_seed(3)
    model = build_gpt_model(ModelConfig(**MODEL, **STYLES[style]), ParallelConfig(), vocab_size=VOCAB)
    # larger than init-scale weights: logits far from uniform, every tensor matters
    return weights_of(randomize(model, seed=4, std=0.05))


@pytest.fixture(scope="module")
def runs():
    with single_rank_parallel_state():
        weights = {style: _initial_weights(style) for style in STYLES}
    tokens = _markov_tokens(LONG_STEPS, GLOBAL_MICRO * GRAD_ACCUM, MODEL["seq_length"])
    by_world: dict[int, list[str]] = {}
    for name, layout in LAYOUTS.items():
        by_world.setdefault(layout["ranks"], []).append(name)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(by_world)) as pool:  # the three worlds overlap their start-up
        futures = {w: pool.submit(run_ranks, _run_layouts, w, names, weights, tokens, timeout_s=840)
                   for w, names in by_world.items()}
        per_world = {w: f.result() for w, f in futures.items()}
    results = {}
    for world, per_rank in per_world.items():
        for name in by_world[world]:
            results[name] = [r[name] for r in per_rank]
    print(f"\nparity runs: {time.perf_counter() - start:.1f}s wall")
    for name, per_rank in results.items():
        steps = [t for r in per_rank for t in r["step_s"][1:]]
        ref = results["ref-llama" if "llama" in name else "ref"][0]
        worst = {key: max(rel_diff(r[key][i], ref[key][i]) for r in per_rank for i in range(STEPS))
                 for key in ("losses", "norms")}
        print(f"  {name:18s} build {max(r['build_s'] for r in per_rank):5.2f}s  step {sum(steps) / len(steps):.3f}s  "
              f"worst rel diff: loss {worst['losses']:.1e} norm {worst['norms']:.1e}")
    bf16_losses, fp32_losses = results["tp2xpp2-bf16"][0]["losses"], results["tp2xpp2"][0]["losses"]
    print(f"  bf16 - fp32 loss (TP=2xPP=2): {[round(a - b, 4) for a, b in zip(bf16_losses, fp32_losses)]}")
    return results


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("name", PARITY)
def test_layout_matches_single_rank(runs, name):
    ref = runs["ref-llama" if "llama" in name else "ref"][0]
    assert_steps_match(name, runs[name], ref, STEPS, LOSS_RTOL, NORM_RTOL)
    assert ref["norms"][0] > 1.0  # clipping (grad_clip=1.0) was active, so the norm fed the update


@pytest.mark.slow
def test_reference_trains(runs):
    losses = runs["ref"][0]["losses"]
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("name", ["pp2", "tp2xpp2", "dp2xpp2", "tp2xpp2-bf16"])
def test_tied_embeddings_stay_in_sync(runs, name):
    diffs = [r["tied_diff"] for r in runs[name]]
    assert all(d is not None for d in diffs), "every rank of a tied PP=2 run holds one of the two copies"
    assert max(diffs) == 0.0, diffs


@pytest.mark.slow
@pytest.mark.numerics
def test_bf16_tp2xpp2_trains_close_to_fp32(runs):
    bf16, fp32 = runs["tp2xpp2-bf16"], runs["tp2xpp2"][0]["losses"]
    for rank, res in enumerate(bf16):
        losses = res["losses"]
        assert losses == bf16[0]["losses"], f"rank {rank} logged another loss"
        assert losses[-1] < losses[0] - 0.05, f"bf16 loss did not go down: {losses}"
        for step, (a, b) in enumerate(zip(losses, fp32)):
            assert abs(a - b) <= BF16_LOSS_RTOL * abs(b), f"step {step + 1}: bf16 {a} vs fp32 {b}"


@pytest.mark.slow
def test_data_parallel_rank_follows_layout(runs):
    # megatron's rank order tp-dp-pp: ranks 0,1 are DP rank 0 under DP=2xTP=2; 0,2 under DP=2xPP=2
    assert [r["dp_rank"] for r in runs["dp2xtp2"]] == [0, 0, 1, 1]
    assert [r["dp_rank"] for r in runs["dp2xpp2"]] == [0, 1, 0, 1]


# --- through the real launcher: checkpoint/resume under TP=2 x PP=2, and layouts refused before training ---------
def _pipeline_config(tmp_path, tokenizer_path, shard_dir, seq_length, **sections):
    from train_utils import tiny_config

    base = dict(
        model={"num_layers": 4},
        parallel={"tensor_parallel": 2, "pipeline_parallel": 2, "zero_stage": 1},
        train={"steps": 4, "micro_batch_size": 2, "grad_accum_steps": 2, "eval_interval": 2, "eval_steps": 2},
        checkpoint={"dir": str(tmp_path / "ckpt"), "save_interval": 2, "keep_last": 3},
    )
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return tiny_config(tmp_path, tokenizer_path, shard_dir, seq_length, **base)


@pytest.mark.slow
def test_tp2xpp2_checkpoint_resume_continues_the_same_run(tmp_path, tokenizer_path, shard_dir, shard_seq_length):
    """Save at step 2 under (TP=2, PP=2), restart from it: steps 3-4 log the same losses as the uninterrupted run."""
    import shutil

    from train_utils import check_ok, launch, losses

    first = tmp_path / "full"
    first.mkdir()
    out = check_ok(launch(_pipeline_config(first, tokenizer_path, shard_dir, shard_seq_length), nproc=4))
    full = losses(out)
    assert sorted(full) == [1, 2, 3, 4] and full[4] < full[1], out[-3000:]
    assert "valid loss" in out  # eval_batch through the pipeline
    ckpt = first / "ckpt" / "step_00000002"
    files = {p.name for p in ckpt.iterdir()}
    # DeepSpeed's pipeline layout: one file per layer and TP rank (layer 0 = embedding, 5 = final norm, 6 = head's
    # tied copy: not saved, re-synced from layer 0 on load), written by data-parallel rank 0
    for layer in range(6):
        for tp in range(2):
            assert f"layer_{layer:02d}-model_{tp:02d}-model_states.pt" in files, sorted(files)
    assert not any(name.startswith("layer_06") for name in files)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(first / "ckpt", resumed / "ckpt")
    shutil.rmtree(resumed / "ckpt" / "step_00000004")
    (resumed / "ckpt" / "latest").write_text("step_00000002")
    out = check_ok(launch(_pipeline_config(resumed, tokenizer_path, shard_dir, shard_seq_length), nproc=4))
    assert "resumed from" in out and "at step 2" in out, out[-3000:]
    again = losses(out)
    assert sorted(again) == [3, 4], out[-3000:]
    assert again == {3: full[3], 4: full[4]}  # the logged 4-decimal losses are identical


MISCONFIGURED = {
    "world size": ({"model": {"hidden_size": 96, "num_attention_heads": 6},
                    "parallel": {"tensor_parallel": 3}}, "parallel.tensor_parallel"),
    "heads": ({"parallel": {"tensor_parallel": 3}, "model": {"num_attention_heads": 4}},
              "model.num_attention_heads=4 is not divisible by parallel.tensor_parallel=3"),
    "zero2 with pp": ({"parallel": {"pipeline_parallel": 2, "zero_stage": 2}},
                      "parallel.zero_stage=2 with parallel.pipeline_parallel=2"),
    "zero0 with pp": ({"parallel": {"pipeline_parallel": 2, "zero_stage": 0}},
                      "parallel.zero_stage=0 with parallel.pipeline_parallel=2"),
    "grad accum < pp": ({"parallel": {"pipeline_parallel": 2, "zero_stage": 1}, "train": {"grad_accum_steps": 1}},
                        "train.grad_accum_steps=1"),
    "layers vs pp x vpp": ({"model": {"num_layers": 2}, "parallel": {"pipeline_parallel": 2, "virtual_pipeline": 2,
                                                                     "zero_stage": 1}},
                           "model.num_layers=2 is not divisible by "
                           "parallel.pipeline_parallel x parallel.virtual_pipeline"),
    "vpp": ({"model": {"num_layers": 4}, "parallel": {"pipeline_parallel": 2, "virtual_pipeline": 2, "zero_stage": 1}},
            "parallel.virtual_pipeline"),
    "sp without tp": ({"parallel": {"sequence_parallel": True}}, "parallel.sequence_parallel"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", MISCONFIGURED)
def test_misconfigured_layout_fails_before_training(tmp_path, tokenizer_path, shard_dir, shard_seq_length, case):
    from train_utils import launch, tiny_config

    sections, message = MISCONFIGURED[case]
    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length, **sections)
    start = time.perf_counter()
    proc = launch(config, nproc=4, timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert message in proc.stdout, proc.stdout[-3000:]
    assert "--module largelm.train.main" not in proc.stdout and "step 1/" not in proc.stdout  # no rank was started
    assert elapsed < 60, f"took {elapsed:.0f}s to fail"


# --- fast: name mapping and the coverage check of load_full_state_dict ---------------------------------------------
@pytest.mark.parametrize("style", list(STYLES))
def test_pipeline_layer_index_covers_every_gptmodel_key(style):
    from largelm.config import ModelConfig, ParallelConfig
    from largelm.model.gpt import build_gpt_model
    from largelm.model.pipeline import pipeline_layer_index
    from largelm.model.weights import load_full_state_dict

    with single_rank_parallel_state():
        model_cfg = ModelConfig(**MODEL, **STYLES[style])
        model = build_gpt_model(model_cfg, ParallelConfig(), vocab_size=VOCAB)
        full = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        L, tied = MODEL["num_layers"], model_cfg.tie_embeddings
        where = {name: pipeline_layer_index(name, L, tied) for name in full}
        assert where["embedding.word_embeddings.weight"] == (0, "embedding.word_embeddings.weight")
        qkv = "self_attention.linear_qkv.weight"
        assert where[f"decoder.layers.3.{qkv}"] == (4, f"layer.{qkv}")
        assert where["decoder.final_layernorm.weight"] == (L + 1, "norm.weight")
        assert {i for i, _ in where.values()} == set(range(L + 2 if tied else L + 3))
        if tied:
            with pytest.raises(KeyError, match="tied"):
                pipeline_layer_index("output_layer.weight", L, tied)
        with pytest.raises(KeyError, match="out of range"):
            pipeline_layer_index(f"decoder.layers.{L}.mlp.linear_fc1.weight", L, tied)

        load_full_state_dict(model, full)  # round trip into the dense model
        missing = dict(full)
        missing.pop("decoder.final_layernorm.weight")
        with pytest.raises(KeyError, match="decoder.final_layernorm.weight"):
            load_full_state_dict(model, missing)
        with pytest.raises(KeyError, match="unexpected"):
            load_full_state_dict(model, dict(full, **{"decoder.layers.9.mlp.linear_fc1.weight": torch.zeros(1)}))

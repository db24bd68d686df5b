"""Mixture-of-experts GPT (``model.arch: moe``; largelm/model/moe.py): config validation, one-rank forward and
backward on megatron-core's MoE layer, parameter layout and FLOPs; expert-parallel parity at 2 and 4 ranks (slow)."""

from __future__ import annotations

import math

import pytest
import torch
from mp_utils import assert_steps_match, free_port, run_ranks
from tolerances import chain_length, sum_rtol
from train_utils import check_ok, config_object, launch, tiny_config

from largelm.checkpoint.consolidated import load_consolidated
from largelm.config import ConfigError
from largelm.convert import api
from largelm.model import layout
from largelm.model.flops import matmul_parameter_count, moe_matmul_parameter_count
from largelm.model.registry import get_arch
from largelm.parallel import groups
from largelm.parallel.cpu_compat import model_parallel_manual_seed
from largelm.parallel.sharding import global_expert_name, local_expert_state_dict

MOE = {"num_experts": 4, "top_k": 2, "ffn_size": 32}


def moe_config(moe: dict = MOE, parallel: dict | None = None, **model):
    return config_object(model={"arch": "moe", "style": "llama", "moe": moe, **model}, parallel=parallel or {})


# --- validation (before any process group) -----------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"moe": {**MOE, "top_k": 5}}, "model.moe.top_k=5 exceeds model.moe.num_experts=4"),
    ({"parallel": {"expert_parallel": 3}}, "model.moe.num_experts=4 is not divisible by parallel.expert_parallel=3"),
    ({"style": "gpt2"}, "model.arch='moe' needs model.style='llama'"),
    ({"parallel": {"pipeline_parallel": 2}}, "model.arch='moe' runs without pipeline parallelism"),
    ({"parallel": {"expert_parallel": 2, "zero_stage": 3}}, "parallel.zero_stage=3 with parallel.expert_parallel=2"),
])
def test_invalid_moe_configs_name_the_field(change, message):
    kwargs = {"moe": change.get("moe", MOE), "parallel": change.get("parallel")}
    if "style" in change:
        kwargs["style"] = change["style"]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        moe_config(**kwargs)


def test_moe_section_goes_with_arch_moe_and_ep_must_divide_dp():
    with pytest.raises(ValueError, match="model.moe is set exactly when model.arch is 'moe'"):
        config_object(model={"moe": MOE})
    with pytest.raises(ValueError, match="parallel.expert_parallel=2 needs model.arch='moe'"):
        config_object(parallel={"expert_parallel": 2})
    with pytest.raises(ValueError, match="parallel.tensor_parallel=2 with model.arch='moe' needs "
                                         "parallel.sequence_parallel: true"):
        moe_config(parallel={"tensor_parallel": 2})
    cfg = moe_config(parallel={"expert_parallel": 2, "tensor_parallel": 2, "sequence_parallel": True})
    cfg.check_world_size(4)  # TP=2 x DP=2, EP=2 divides DP
    with pytest.raises(ConfigError, match="parallel.expert_parallel=2 does not divide the data-parallel size 1"):
        cfg.check_world_size(2)


# --- one rank ------------------------------------------------------------------------------------------------------
def _one_rank(expert_parallel: int = 1):
    groups.init_distributed("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    groups.init_model_parallel(1, 1, expert_parallel=expert_parallel)
    model_parallel_manual_seed(5)


def test_moe_forward_backward_single_rank():
    moe = {**MOE, "shared_expert_ffn_size": 16, "layer_freq": 2,
           "router": {"aux_loss_coeff": 0.01, "z_loss_coeff": 0.001, "capacity_factor": 1.0}}
    cfg = moe_config(moe, num_layers=3)
    _one_rank()
    try:
        arch = get_arch("moe")
        model = arch.build_model(cfg.model, cfg.parallel, dtype=torch.float32)
        names = dict(model.named_parameters())
        # megatron's names (what a Mixtral export maps): MoE in layers 0 and 2, dense MLP in layer 1
        assert "decoder.layers.0.mlp.router.weight" in names
        assert "decoder.layers.2.mlp.experts.local_experts.3.linear_fc2.weight" in names
        assert "decoder.layers.0.mlp.shared_experts.linear_fc1.weight" in names
        assert "decoder.layers.1.mlp.linear_fc1.weight" in names
        # the layout table knows every parameter with its shape
        shapes = arch.param_shapes(cfg.model, None, cfg.model.vocab_size)
        assert {k: tuple(v.shape) for k, v in names.items() if k != layout.WORD_EMBEDDINGS} == \
            {k: v for k, v in shapes.items() if k != layout.WORD_EMBEDDINGS}
        tokens = torch.randint(0, cfg.model.vocab_size, (4, cfg.model.seq_length + 1),
                               generator=torch.Generator().manual_seed(0))
        model.zero_grad()
        out = arch.forward_metrics(model, {"tokens": tokens}, cfg)
        out["loss"].backward()
        assert math.isfinite(out["loss"].item())
        assert abs(out["loss"].item() - math.log(cfg.model.padded_vocab_size())) < 0.5  # near-uniform at init
        # balanced-ish routing at init: every expert gets a share, entropy up to log(E)
        assert 0 < out["expert_share_min"].item() <= 1 / 4 <= out["expert_share_max"].item() < 1
        assert 0 < out["expert_share_entropy"].item() <= math.log(4) + 1e-6
        assert 0 <= out["dropped_tokens"].item() < 1  # capacity factor 1.0: some tokens may be dropped
        assert out["aux_loss"].item() > 0.5 and out["z_loss"].item() > 0  # switch loss ~1 when balanced
        # every parameter that took part gets a gradient; the router's includes the aux/z-loss terms
        for name in ("decoder.layers.0.mlp.router.weight", "decoder.layers.2.mlp.experts.local_experts.0"
                     ".linear_fc1.weight", "decoder.layers.0.mlp.shared_experts.linear_fc2.weight"):
            assert names[name].grad is not None and names[name].grad.abs().sum() > 0, name
        # the tracker was read and cleared: a second forward reports its own values, not a sum of two
        again = arch.forward_metrics(model, {"tokens": tokens}, cfg)
        assert torch.allclose(again["aux_loss"], out["aux_loss"], rtol=1e-5)
    finally:
        groups.destroy()


def test_expert_names_map_between_global_and_rank_local():
    full = {"decoder.layers.0.mlp.router.weight": torch.zeros(4, 2),
            **{f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight": torch.full((1,), float(e))
               for e in range(4)}}
    rank1 = local_expert_state_dict(full, ep_rank=1, ep_size=2)
    assert sorted(rank1) == ["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight",
                             "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight",
                             "decoder.layers.0.mlp.router.weight"]
    assert rank1["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"].item() == 3.0  # global expert 3
    assert {global_expert_name(k, 1, 2): v for k, v in rank1.items()}.keys() <= full.keys()
    assert local_expert_state_dict(full, 0, 1) is full
    # experts (routed and shared) are tensor-parallel like the dense MLP: fc1 by rows (SwiGLU stride 2), fc2 by columns
    for name in ("decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight",
                 "decoder.layers.0.mlp.shared_experts.linear_fc1.weight"):
        assert layout.tp_partition(name, gated=True) == (0, 2)
        assert layout.tp_partition(name.replace("fc1", "fc2"), gated=True) == (1, 1)
    assert layout.tp_partition("decoder.layers.0.mlp.router.weight", gated=True) is None


def test_active_parameter_count_counts_top_k_experts():
    cfg = moe_config(num_layers=2, hidden_size=64, ffn_hidden_size=128)
    h, f = 64, 32
    dense = config_object(model={"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "style": "llama",
                                 "ffn_hidden_size": 128, "seq_length": 16, "vocab_size": 200})
    dense_mlp = 3 * h * 128
    per_moe_layer = h * 4 + 2 * 3 * h * f  # router + top_k=2 SwiGLU experts
    assert moe_matmul_parameter_count(cfg.model) == \
        matmul_parameter_count(dense.model) + 2 * (per_moe_layer - dense_mlp)


# --- expert parallelism: EP=2 trains exactly like EP=1 (slow: spawned gloo ranks, real DeepSpeed ZeRO) -------------
VOCAB = 200  # padded to 256 at TP=1 (x64) and TP=2 (x128): the same shapes in every layout
PARITY_MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=VOCAB,
                    make_vocab_size_divisible_by=64, ffn_hidden_size=64)
PARITY_MOE = {"num_experts": 4, "top_k": 2, "ffn_size": 32, "shared_expert_ffn_size": 16,
              "router": {"aux_loss_coeff": 0.01, "z_loss_coeff": 0.001}}
GLOBAL_MICRO, GRAD_ACCUM, STEPS = 4, 2, 3
# fp32 loss and gradient norm differ between layouts only in summation order (the experts' matmuls over gathered
# vs local tokens, gradient sums over ranks): one step's reduction chain, forward and backward (tests/tolerances.py)
PARITY_RTOL = sum_rtol(chain_length(layers=2, hidden=64, ffn=64, seq=16, heads=4, vocab=256,
                                    tokens=GLOBAL_MICRO * GRAD_ACCUM * 16, backward=True))


def parity_config(tp: int, ep: int, zero_stage: int):
    return config_object(model={"arch": "moe", "style": "llama", "moe": PARITY_MOE, **PARITY_MODEL},
                         parallel={"tensor_parallel": tp, "sequence_parallel": tp > 1, "expert_parallel": ep,
                                   "zero_stage": zero_stage,
                                   "single_replica_zero": "as_configured"},
                         train={"steps": STEPS, "micro_batch_size": GLOBAL_MICRO, "grad_accum_steps": GRAD_ACCUM,
                                "precision": "fp32", "seed": 3},
                         optimizer={"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 0, "grad_clip": 1.0})


def full_weights() -> dict:
    """Full (TP=1, EP=1) initial weights every layout starts from: N(0, 0.05^2), norms 1."""
    cfg = parity_config(1, 1, 2)
    g = torch.Generator().manual_seed(0)
    shapes = layout.moe_param_shapes(cfg.model, cfg.model.padded_vocab_size())
    return {name: torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.05
            for name, shape in shapes.items()}


def _train_layouts(rank: int, world_size: int, layouts: list[tuple[int, int, int]], weights: dict,
                   tokens: torch.Tensor) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from largelm.train.step import build_step

    groups.init_distributed()  # launcher-style environment from run_ranks
    out = {}
    try:
        for tp, ep, zero in layouts:
            cfg = parity_config(tp, ep, zero)
            cfg.check_world_size(world_size)
            groups.init_model_parallel(tp, 1, expert_parallel=ep)
            torch.manual_seed(cfg.train.seed)
            model_parallel_manual_seed(cfg.train.seed)
            step = build_step(cfg, world_size, init_state_dict=weights)
            dp_rank = parallel_state.get_data_parallel_rank()
            dp = parallel_state.get_data_parallel_world_size()
            per_rank = GLOBAL_MICRO // dp
            losses, norms = [], []
            for s in range(STEPS):
                micro = [{"tokens": tokens[s, k * GLOBAL_MICRO + dp_rank * per_rank:][:per_rank]}
                         for k in range(GRAD_ACCUM)]
                loss = step.train_step(iter(micro)).detach().float()
                dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())  # what the trainer logs
                losses.append(loss.item() / dp)
                norms.append(float(step.engine.get_global_grad_norm()))
            out[(tp, ep, zero)] = dict(losses=losses, norms=norms)
            del step
            parallel_state.destroy_model_parallel()
    finally:
        groups.destroy()
    return out


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_MICRO * GRAD_ACCUM, PARITY_MODEL["seq_length"] + 1),
                         generator=torch.Generator().manual_seed(1))


def _assert_layouts_match(results: list[dict], reference: tuple, layouts: list[tuple]) -> None:
    for tp, ep, zero in layouts:
        assert_steps_match(f"TP={tp} EP={ep} ZeRO-{zero}", [res[(tp, ep, zero)] for res in results],
                           results[0][reference], STEPS, PARITY_RTOL, PARITY_RTOL, ref_name="EP=1")


@pytest.mark.slow
def test_expert_parallel_2_equals_1():
    """2 ranks (DP=2): EP=2 (each rank holds 2 of the 4 experts) trains like EP=1 under ZeRO-1 and ZeRO-2: losses
    and pre-clipping gradient norms after each of 3 steps (clipping at 1.0 and Adam make later losses depend on
    every gradient)."""
    layouts = [(1, 1, 2), (1, 2, 2), (1, 2, 1)]
    results = run_ranks(_train_layouts, 2, layouts, full_weights(), _tokens(), timeout_s=240)
    _assert_layouts_match(results, (1, 1, 2), layouts[1:])


@pytest.mark.slow
def test_expert_data_parallel_and_tensor_parallel_with_experts():
    """4 ranks: DP=4 with EP=2 (expert gradients averaged over expert-data-parallel pairs) trains like DP=4 with
    EP=1, and TP=2 x EP=2 (experts split over TP as well; with sequence parallelism, which megatron's MoE layer
    requires under TP) like TP=2 x EP=1. Each reference has the same data-parallel size: the load-balancing loss is
    a statistic of the tokens one data-parallel rank routes (expert shares x mean probabilities over its batch), not
    a mean of per-token terms, so it changes with the per-rank batch and only EP must not change it."""
    layouts = [(1, 1, 2), (1, 2, 2), (2, 1, 2), (2, 2, 2)]
    results = run_ranks(_train_layouts, 4, layouts, full_weights(), _tokens(), timeout_s=400)
    _assert_layouts_match(results, (1, 1, 2), [(1, 2, 2)])
    _assert_layouts_match(results, (2, 1, 2), [(2, 2, 2)])


@pytest.mark.slow
def test_tensor_parallel_moe_checkpoint_consolidates(tmp_path, tokenizer_path, shard_dir, shard_seq_length):
    """A TP=2+SP, EP=1 MoE run (shared expert, every other layer MoE) through the real launcher consolidates to full
    weights whose logits equal the checkpoint's in its own layout (largelm-convert's verification, fp32 tolerance);
    every expert is there, TP-unsharded."""
    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length,
                         model={"arch": "moe", "style": "llama", "num_layers": 2,
                                "moe": {**MOE, "shared_expert_ffn_size": 16, "layer_freq": 2}},
                         parallel={"tensor_parallel": 2, "sequence_parallel": True, "zero_stage": 1},
                         train={"steps": 2, "grad_accum_steps": 1})
    check_ok(launch(config, nproc=2, timeout=300))
    checks = api.consolidate(tmp_path / "ckpt", tmp_path / "hub", log=print)
    hub = load_consolidated(tmp_path / "hub")
    assert checks and all(check.ok for check in checks)
    assert hub.tensors["decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"].shape == (2 * 32, 64)
    assert hub.tensors["decoder.layers.0.mlp.shared_experts.linear_fc2.weight"].shape == (64, 16)
    assert "decoder.layers.1.mlp.linear_fc1.weight" in hub.tensors  # the dense layer

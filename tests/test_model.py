"""largelm.model against an independent plain-PyTorch GPT (tests/reference_gpt.py), on CPU/gloo.

Tolerances (tests/tolerances.py, error models rather than one machine's rounding): megatron's fp32 losses, logits
and gradients must be as accurate as the plain reference's fp32 ones against the reference run in float64
(``f64_bound``: within 4x the reference's own fp32 error, per tensor; measured ratios 0.5-2); TP=2 likewise against
the single rank run in float64.
"""

import pytest
import torch
from mp_utils import randomize, run_ranks
from reference_gpt import RefConfig, ReferenceGPT
from tolerances import UBF16, chain_length, f64_bound, fp32_rounding_tol, max_err

from largelm.config import ConfigError, ModelConfig, ParallelConfig
from largelm.model.flops import flops_per_token, matmul_parameter_count, parameter_count
from largelm.model.gpt import build_gpt_model, gpt_forward_loss, resolve_vocab_size, split_tokens
from largelm.model.specs import build_transformer_config
from largelm.parallel.cpu_compat import model_parallel_manual_seed

TOKENIZER_VOCAB = 200  # padded by make_vocab_size_divisible_by=128 to:
PADDED_VOCAB = 256
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=TOKENIZER_VOCAB)
CONFIGS = {
    "gpt2": dict(style="gpt2", **TINY),
    "llama": dict(style="llama", num_query_groups=2, tie_embeddings=False, **TINY),  # GQA: 2 heads per group
}
# TINY's loss over a batch of 3 x 16 tokens: the reductions it passes through (tolerances.chain_length)
LOSS_CHAIN = chain_length(layers=2, hidden=64, ffn=256, seq=16, heads=4, vocab=PADDED_VOCAB, tokens=3 * 16)


def build(style, parallel=None, seed=1, **overrides):
    model_parallel_manual_seed(seed)
    return build_gpt_model(
        ModelConfig(**CONFIGS[style]), parallel or ParallelConfig(), vocab_size=TOKENIZER_VOCAB, **overrides
    )


def reference_for(style, state_dict):
    ref = ReferenceGPT(RefConfig.from_model_config(ModelConfig(**CONFIGS[style]), PADDED_VOCAB))
    ref.load_from_megatron(state_dict)
    return ref


def batch(seed=0, b=3):
    return torch.randint(0, TOKENIZER_VOCAB, (b, TINY["seq_length"] + 1), generator=torch.Generator().manual_seed(seed))


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


# --- naming and shapes ------------------------------------------------------------------------------
LAYER_GPT2 = [
    "input_layernorm.weight", "input_layernorm.bias",
    "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
    "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",
    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias",
]  # fmt: skip
LAYER_LLAMA = [
    "input_layernorm.weight", "self_attention.linear_proj.weight", "self_attention.linear_qkv.weight",
    "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
]  # fmt: skip


def test_parameter_names_and_shapes_per_style(tp1):
    gpt2 = {n: tuple(p.shape) for n, p in build("gpt2").named_parameters()}
    assert list(gpt2) == (
        ["embedding.word_embeddings.weight", "embedding.position_embeddings.weight"]
        + [f"decoder.layers.{i}.{n}" for i in range(2) for n in LAYER_GPT2]
        + ["decoder.final_layernorm.weight", "decoder.final_layernorm.bias"]
    )  # tied: no output_layer.weight
    assert gpt2["embedding.word_embeddings.weight"] == (PADDED_VOCAB, 64)
    assert gpt2["embedding.position_embeddings.weight"] == (16, 64)
    assert gpt2["decoder.layers.0.self_attention.linear_qkv.weight"] == (3 * 64, 64)
    assert gpt2["decoder.layers.0.mlp.linear_fc1.weight"] == (256, 64)

    llama = {n: tuple(p.shape) for n, p in build("llama").named_parameters()}
    assert list(llama) == (
        ["embedding.word_embeddings.weight"]
        + [f"decoder.layers.{i}.{n}" for i in range(2) for n in LAYER_LLAMA]
        + ["decoder.final_layernorm.weight", "output_layer.weight"]
    )
    # GQA: 4 query heads + 2 key + 2 value heads of 16; SwiGLU fc1 = [gate; up], ffn 256 each
    assert llama["decoder.layers.0.self_attention.linear_qkv.weight"] == ((4 + 2 + 2) * 16, 64)
    assert llama["decoder.layers.0.mlp.linear_fc1.weight"] == (2 * 256, 64)
    assert llama["output_layer.weight"] == (PADDED_VOCAB, 64)


def test_pipeline_stage_flags_select_embedding_and_head(tp1):
    first = build("llama", post_process=False)  # first stage of a pipeline: embedding + layers
    names = [n for n, _ in first.named_parameters()]
    assert names[0] == "embedding.word_embeddings.weight"
    assert not any(n.startswith(("output_layer", "decoder.final_layernorm")) for n in names)
    input_ids, _, position_ids = split_tokens(batch())
    assert first(input_ids, position_ids, None).shape == (16, 3, 64)  # hidden states [s, b, h] for the next stage
    last = build("llama", pre_process=False)  # last stage: layers + final norm + head
    names = [n for n, _ in last.named_parameters()]
    assert not any(n.startswith("embedding") for n in names) and names[-1] == "output_layer.weight"


# --- numerical equivalence with the reference ---------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_megatron_model_equals_reference(tp1, style):
    """Megatron's fp32 per-token losses, mean, logits and (mapped) gradients are as accurate as the plain reference's
    fp32 ones, both against the reference in float64 on the same weights (``f64_bound``)."""
    model = randomize(build(style))
    ref = reference_for(style, model.state_dict())
    exact = reference_for(style, model.state_dict()).double()
    tokens = batch()
    input_ids, labels, position_ids = split_tokens(tokens)

    per_token, mean = gpt_forward_loss(model, tokens)
    ref_per_token = ref.per_token_loss(input_ids, labels)
    exact_per_token = exact.per_token_loss(input_ids, labels)
    assert per_token.shape == (3, 16) and exact_per_token.dtype == torch.float64
    assert max_err(per_token, exact_per_token) <= f64_bound(ref_per_token, exact_per_token)
    assert max_err(mean, exact_per_token.mean()) <= f64_bound(ref_per_token.mean(), exact_per_token.mean())
    assert abs(mean.item() - torch.log(torch.tensor(PADDED_VOCAB)).item()) > 0.5  # not a near-uniform model

    with torch.no_grad():
        logits = model(input_ids, position_ids, None)  # no labels: [b, s, V] logits
        assert max_err(logits, exact(input_ids)) <= f64_bound(ref(input_ids), exact(input_ids))

    mean.backward()
    ref_per_token.mean().backward()
    exact_per_token.mean().backward()
    # Map megatron's gradients through the same layout conversion as the weights, then compare all.
    grads = reference_for(style, {n: p.grad for n, p in model.named_parameters()})
    ref_grads, exact_grads = dict(ref.named_parameters()), dict(exact.named_parameters())
    for name, mapped in grads.named_parameters():
        err, tol = max_err(mapped, exact_grads[name].grad), f64_bound(ref_grads[name].grad, exact_grads[name].grad)
        assert err <= tol, f"{name}: {err:.3g} > {tol:.3g}"


def _swap_halves(t, dim=0):
    a, b = t.chunk(2, dim=dim)
    return torch.cat([b, a], dim=dim)


def test_reference_comparison_detects_layout_mistakes(tp1):
    """The equivalence test can fail: a wrong fc1 [gate; up] order or a wrong QKV grouping changes the
    loss far beyond the tolerance (100x the rounding bound of the loss's reduction chain)."""
    tokens = batch()
    input_ids, labels, _ = split_tokens(tokens)

    llama = randomize(build("llama"))
    _, mean = gpt_forward_loss(llama, tokens)
    sd = weights(llama)
    sd["decoder.layers.0.mlp.linear_fc1.weight"] = _swap_halves(sd["decoder.layers.0.mlp.linear_fc1.weight"])
    far = 100 * fp32_rounding_tol(LOSS_CHAIN, mean.item())
    assert abs(reference_for("llama", sd).per_token_loss(input_ids, labels).mean().item() - mean.item()) > far

    gpt2 = randomize(build("gpt2"))
    _, mean = gpt_forward_loss(gpt2, tokens)
    sd = weights(gpt2)
    # MHA: megatron's rows are per head [q_h; k_h; v_h] (16 rows each). Pretend they were one
    # [Q; K; V] block (the nanoGPT/HF fused layout) and convert that to megatron's per-head order.
    w = sd["decoder.layers.0.self_attention.linear_qkv.weight"]
    q, k, v = w.view(3, 64, 64).unbind(0)
    heads = [torch.cat([q[h * 16:(h + 1) * 16], k[h * 16:(h + 1) * 16], v[h * 16:(h + 1) * 16]]) for h in range(4)]
    sd["decoder.layers.0.self_attention.linear_qkv.weight"] = torch.cat(heads)
    far = 100 * fp32_rounding_tol(LOSS_CHAIN, mean.item())
    assert abs(reference_for("gpt2", sd).per_token_loss(input_ids, labels).mean().item() - mean.item()) > far


# --- calling convention -----------------------------------------------------------------------------
def test_gpt_forward_loss_convention(tp1):
    model = build("gpt2")
    tokens = batch()
    per_token, mean = gpt_forward_loss(model, tokens)
    assert per_token.shape == (3, 16) and per_token.dtype == torch.float32
    # means of the same 48 (15) fp32 values summed in another order (tolerances.py, reduction chains)
    assert max_err(mean, per_token.mean()) <= fp32_rounding_tol(48, per_token.abs().max().item())
    mask = torch.zeros(3, 16)
    mask[:, :5] = 1
    _, masked = gpt_forward_loss(model, tokens, loss_mask=mask)
    assert max_err(masked, per_token[:, :5].mean()) <= fp32_rounding_tol(48, per_token.abs().max().item())
    # the label of position t is token t+1
    input_ids, labels, position_ids = split_tokens(tokens)
    assert torch.equal(input_ids, tokens[:, :-1]) and torch.equal(labels, tokens[:, 1:])
    assert torch.equal(position_ids[1], torch.arange(16))
    with pytest.raises(ValueError, match="batch, seq"):
        gpt_forward_loss(model, tokens[:, :1])


def test_parameter_count_and_flops(tp1):
    for style in CONFIGS:
        model = build(style)
        ref = ReferenceGPT(RefConfig.from_model_config(ModelConfig(**CONFIGS[style]), PADDED_VOCAB))
        expected = sum(p.numel() for p in ref.parameters())
        assert parameter_count(model) == expected
        assert parameter_count(model, whole_model=True) == expected
        cfg = ModelConfig(**CONFIGS[style])
        linear = sum(m.weight.numel() for m in ref.modules() if isinstance(m, torch.nn.Linear))
        if cfg.tie_embeddings:  # the logit projection reuses wte, still a matmul
            linear += PADDED_VOCAB * 64
        assert matmul_parameter_count(cfg) == linear
        assert flops_per_token(cfg) == 6 * linear + 12 * 2 * 64 * 16


def test_transformer_config_follows_style_and_device():
    llama, gpt2 = ModelConfig(**CONFIGS["llama"]), ModelConfig(**CONFIGS["gpt2"])
    cpu = build_transformer_config(llama, ParallelConfig(), on_cuda=False)
    assert cpu.use_cpu_initialization and cpu.normalization == "RMSNorm" and cpu.gated_linear_unit
    assert not cpu.add_bias_linear and cpu.num_query_groups == 2 and cpu.ffn_hidden_size == 256
    assert not any([cpu.bias_dropout_fusion, cpu.bias_activation_fusion, cpu.masked_softmax_fusion,
                    cpu.gradient_accumulation_fusion, cpu.persist_layer_norm, cpu.apply_rope_fusion])  # fmt: skip
    gpu = build_transformer_config(llama, ParallelConfig(), torch.bfloat16, on_cuda=True)
    assert not gpu.use_cpu_initialization and gpu.bf16 and gpu.params_dtype == torch.bfloat16
    assert gpu.bias_dropout_fusion and gpu.bias_activation_fusion and not gpu.gradient_accumulation_fusion
    gpu_gpt2 = build_transformer_config(gpt2, ParallelConfig(), on_cuda=True)
    assert not gpu_gpt2.bias_activation_fusion  # megatron's fused GeLU is the tanh approximation
    assert gpu_gpt2.normalization == "LayerNorm" and gpu_gpt2.add_bias_linear and gpu_gpt2.ffn_hidden_size == 256


def test_activation_recompute_replays_dropout(tp1):
    """Full-layer recompute with dropout on gives exactly the plain model's loss and gradients: the
    CPU RNG tracker and RNG-state patches let megatron replay both dropout streams."""
    results = []
    for overrides in ({}, dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)):
        cfg = dict(CONFIGS["llama"], hidden_dropout=0.2, attention_dropout=0.2)
        model_parallel_manual_seed(1)
        model = build_gpt_model(ModelConfig(**cfg), ParallelConfig(), vocab_size=TOKENIZER_VOCAB, **overrides)
        if results:
            model.load_state_dict(results[0][2])
        model_parallel_manual_seed(7)
        _, mean = gpt_forward_loss(model, batch())
        mean.backward()
        results.append((mean.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, model.state_dict()))
    (plain_loss, plain_grads, _), (recompute_loss, recompute_grads, _) = results
    # recompute runs the same kernels on the same inputs again: bit-identical on any CPU (as tests/test_recompute.py
    # asserts for whole training steps)
    assert recompute_loss == plain_loss
    for name, grad in plain_grads.items():
        assert torch.equal(recompute_grads[name], grad), name
    model.eval()  # dropout really acted: the eval loss differs by far more than rounding
    far = 100 * fp32_rounding_tol(LOSS_CHAIN, plain_loss)
    assert abs(gpt_forward_loss(model, batch())[1].item() - plain_loss) > far


@pytest.mark.numerics
def test_bf16_model_is_bf16_throughout_and_close_to_fp32(tp1):
    for style in CONFIGS:
        fp32 = build(style)
        bf16 = build(style, dtype=torch.bfloat16)
        assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}  # norms too
        bf16.load_state_dict(fp32.state_dict())
        _, loss32 = gpt_forward_loss(fp32, batch())
        _, loss16 = gpt_forward_loss(bf16, batch())
        # bf16 weights and activations, each one bf16 rounding (2^-8 relative) off its fp32 value, with fp32
        # accumulation inside the matmuls: the loss (a mean of fp32 cross entropies) within one bf16 rounding of
        # the fp32 loss, relative (measured: ~1% of that, natively and under AVX2 emulation: the roundings average)
        assert abs(loss16.item() - loss32.item()) <= UBF16 * abs(loss32.item()), style
        loss16.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in bf16.parameters())


def test_deepspeed_mpu_answers_from_parallel_state(tp1):
    from megatron.core import parallel_state

    from largelm.parallel.groups import DeepSpeedMPU, device

    mpu = DeepSpeedMPU()
    assert mpu.get_model_parallel_world_size() == mpu.get_data_parallel_world_size() == 1
    assert mpu.get_tensor_model_parallel_world_size() == mpu.get_pipeline_model_parallel_world_size() == 1
    assert mpu.get_model_parallel_rank() == mpu.get_data_parallel_rank() == 0
    assert mpu.get_tensor_model_parallel_rank() == mpu.get_pipeline_model_parallel_rank() == 0
    assert mpu.get_tensor_model_parallel_src_rank() == 0
    assert mpu.get_data_parallel_group_ranks() == [0]
    assert mpu.get_tensor_model_parallel_group() is parallel_state.get_tensor_model_parallel_group()
    assert mpu.get_data_parallel_group() is parallel_state.get_data_parallel_group()
    # DeepSpeed reads these as Ulysses sequence parallelism, which megatron's SP is not
    assert not hasattr(mpu, "get_sequence_parallel_world_size") and not hasattr(mpu, "initialize_sequence_parallel")
    assert device() == torch.device("cpu")


def test_vocab_size_resolution():
    cfg = ModelConfig(**dict(CONFIGS["gpt2"], vocab_size=None))
    assert resolve_vocab_size(cfg, 300).padded_vocab_size(2) == 512
    assert resolve_vocab_size(ModelConfig(**CONFIGS["gpt2"]), 150).vocab_size == TOKENIZER_VOCAB  # config wins
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        resolve_vocab_size(ModelConfig(**CONFIGS["gpt2"]), 201)
    with pytest.raises(ConfigError, match="not set"):
        resolve_vocab_size(cfg, None)


# --- tensor parallel: 2 gloo ranks ------------------------------------------------------------------
def _tp2_rank(rank, world_size, cases):
    import deepspeed

    from largelm.parallel import groups
    from largelm.parallel.sharding import shard_state_dict

    groups.init_distributed()  # from the launcher environment, like a real run
    groups.init_model_parallel(tensor_parallel=2, pipeline_parallel=1)
    out = []
    try:
        for case in cases:
            parallel = ParallelConfig(tensor_parallel=2, sequence_parallel=case["sequence_parallel"])
            model_parallel_manual_seed(1)
            model = build_gpt_model(ModelConfig(**case["config"]), parallel, vocab_size=TOKENIZER_VOCAB)
            model.load_state_dict(shard_state_dict(case["weights"], model, rank, 2))
            local_params = parameter_count(model)
            engine = model
            if case["deepspeed"]:  # ZeRO-1 engine told about TP through DeepSpeedMPU
                engine, *_ = deepspeed.initialize(
                    model=model,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                    mpu=groups.DeepSpeedMPU(),
                    config={
                        "train_micro_batch_size_per_gpu": 2,
                        "zero_optimization": {"stage": 1},
                        "zero_allow_untested_optimizer": True,
                        "gradient_clipping": 1.0,
                        "steps_per_print": 10**9,
                    },
                    dist_init_required=False,
                )
            per_token, mean = gpt_forward_loss(engine, case["tokens"])
            result = dict(loss_err=max_err(per_token, case["per_token64"]), local_params=local_params)
            if case["deepspeed"]:
                engine.backward(mean)
                engine.step()
                result["grad_norm"] = float(engine.get_global_grad_norm())
            else:
                mean.backward()
                exact = shard_state_dict(case["grads64"], model, rank, 2)
                result["grad_err"] = {n: max_err(p.grad, exact[n]) for n, p in model.named_parameters()}
            result["params"] = parameter_count(model, whole_model=True)
            out.append(result)
    finally:
        groups.destroy()
    return out


def _loss_f64(style: str, weights: dict, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Per-token losses and gradients of the TP=1 megatron model in float64 (its own loss works in fp32, so the
    cross entropy is taken here from its float64 logits)."""
    model = build(style)
    model.load_state_dict(weights)
    model.double()
    input_ids, labels, position_ids = split_tokens(tokens)
    logits = model(input_ids, position_ids, None)
    assert logits.dtype == torch.float64
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    per_token.mean().backward()
    return per_token.detach().view_as(labels), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.numerics
def test_tensor_parallel_2_equals_single_rank(tp1):
    """TP=2 (and TP=2 + sequence parallel) on two gloo processes computes the TP=1 loss and, shard by
    shard, the TP=1 gradients: real all-reduce/all-gather/reduce-scatter through the compat layer.
    A DeepSpeed ZeRO-1 engine given DeepSpeedMPU reports the TP=1 global gradient norm (it must count
    TP-replicated parameters once and sum sharded ones over the TP group). "Computes the TP=1 values": as accurately
    as the TP=1 fp32 run does, against the TP=1 model in float64 (tolerances.f64_bound; TP changes summation order
    only); the gradient norm within the norm of the gradients' error (triangle inequality) plus its own rounding."""
    from tolerances import K_F64, U32, sum_rtol

    cases = []
    for style in ("gpt2", "llama"):
        model = randomize(build(style))
        tokens = batch(b=2)
        per_token, mean = gpt_forward_loss(model, tokens)
        mean.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        per_token64, grads64 = _loss_f64(style, weights(model), tokens)
        norm64 = torch.sqrt(sum(g.pow(2).sum() for g in grads64.values())).item()
        grads_err = torch.sqrt(sum((grads[n].double() - g).pow(2).sum() for n, g in grads64.items())).item()
        params = parameter_count(model)
        common = dict(
            config=CONFIGS[style], weights=weights(model), tokens=tokens, per_token64=per_token64, grads64=grads64,
            params=params, grad_norm64=norm64, loss_tol=f64_bound(per_token.detach(), per_token64),
            grad_tol={n: f64_bound(g, grads64[n]) for n, g in grads.items()},
            norm_tol=K_F64 * (grads_err + U32 * norm64) + sum_rtol(params) * norm64,
        )  # fmt: skip
        for sp, ds in ((False, False), (True, False), (False, True)):
            cases.append(dict(common, sequence_parallel=sp, deepspeed=ds))
    per_rank = run_ranks(_tp2_rank, 2, cases, timeout_s=600)
    for rank, results in enumerate(per_rank):
        for case, res in zip(cases, results):
            what = f"rank {rank} {case['config']['style']} sp={case['sequence_parallel']} ds={case['deepspeed']}"
            assert res["loss_err"] <= case["loss_tol"], what
            if case["deepspeed"]:
                assert abs(res["grad_norm"] - case["grad_norm64"]) <= case["norm_tol"], what
            else:
                for name, err in res["grad_err"].items():
                    assert err <= case["grad_tol"][name], f"{what}: {name} off by {err} > {case['grad_tol'][name]}"
            assert res["params"] == case["params"], what
            assert res["local_params"] < res["params"], what  # really sharded

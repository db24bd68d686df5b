"""The MoE GPT (``model.arch: moe``) <-> Hugging Face ``MixtralForCausalLM`` (largelm/model/hf/mixtral.py): export
through the CLI's API with its own logit check, ``transformers`` loading and generating from it, import back
bit-exact, a transformers-written Mixtral round trip, refusals naming the field; (slow) an expert-parallel training
checkpoint exported.

Tolerances: two fp32 forwards of the same weights differ only in rounding (``tolerances.fp32_rounding_tol`` of the
logits' reduction chain, the MoE layer's reductions counted: router logits (``hidden``), the top-k softmax
(``num_experts``), each expert's fc1 (``hidden``) and fc2 (``moe.ffn_size``) and the weighted sum over ``top_k``).
That bound holds only while both sides route every token to the same experts: a token whose k-th and (k+1)-th
router logits are closer than the two sides' router logits can differ (``sum_rtol`` of the chain up to the router,
relative to max(1, max |router logit|): already a bound on the difference of two evaluations) could pick another
expert on one side. The tests check this premise on their batch (``min_routing_gap``) instead of hoping for it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from mp_utils import free_port, run_ranks
from tolerances import chain_length, fp32_rounding_tol, max_err, sum_rtol
from train_utils import tiny_config

from largelm.checkpoint.consolidated import Consolidated, load_consolidated, save_consolidated, strip_vocab_padding
from largelm.config import ModelConfig, ParallelConfig
from largelm.convert import api, verify
from largelm.errors import UnsupportedArchitecture
from largelm.model.hf import mixtral
from largelm.model.registry import get_arch
from largelm.parallel.cpu_compat import model_parallel_manual_seed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 1000  # the tokenizer fixture's vocabulary
MOE = {"num_experts": 4, "top_k": 2, "ffn_size": 24}
TINY_MOE = dict(arch="moe", style="llama", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                seq_length=16, vocab_size=VOCAB, make_vocab_size_divisible_by=64, tie_embeddings=False,
                rotary_base=500000.0, norm_epsilon=1e-6, moe=MOE)


def moe_chain(model: ModelConfig) -> int:
    """The logits' reduction chain (``tolerances.chain_length``) with each layer's MoE reductions."""
    moe = model.moe
    per_layer_moe = model.hidden_size + moe.num_experts + model.hidden_size + moe.ffn_size + moe.top_k
    dense_mlp = model.hidden_size + model.ffn_size  # what chain_length counts per layer for a dense MLP
    return chain_length(layers=model.num_layers, hidden=model.hidden_size, ffn=model.ffn_size,
                        seq=model.positions, heads=model.num_attention_heads,
                        extra=model.num_layers * max(per_layer_moe - dense_mlp, 0))


def moe_logit_tol(model: ModelConfig, max_abs_logit: float) -> float:
    return fp32_rounding_tol(moe_chain(model), max(1.0, max_abs_logit))


def min_routing_gap(hf_model, tokens: torch.Tensor, model: ModelConfig) -> tuple[float, float]:
    """(smallest gap between a token's k-th and (k+1)-th router logit, the rounding bound of a router logit)
    over every MoE layer on ``tokens`` - transformers' router logits."""
    with torch.no_grad():
        out = hf_model(input_ids=tokens, output_router_logits=True)
    k = hf_model.config.num_experts_per_tok
    gaps, largest = [], 0.0
    for logits in out.router_logits:  # one [tokens, experts] per layer
        top = logits.float().topk(k + 1, dim=-1).values
        gaps.append((top[:, k - 1] - top[:, k]).min().item())
        largest = max(largest, logits.abs().max().item())
    return min(gaps), sum_rtol(moe_chain(model)) * max(1.0, largest)

def mixtral_logits(hf_dir, model_cfg):
    """(transformers' MixtralForCausalLM from ``hf_dir``, the conversion check's tokens, its fp32 logits); asserts
    first that no token is near a routing tie (where the parity bound would not apply)."""
    from transformers import MixtralForCausalLM  # lazy (as the tests below: transformers' import takes seconds)

    hf_model = MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = verify.fixed_tokens(model_cfg)
    gap, router_rounding = min_routing_gap(hf_model, tokens, model_cfg)
    assert gap > router_rounding, "a near-tie in routing: the parity bound does not apply to this batch"
    with torch.no_grad():
        return hf_model, tokens, hf_model(input_ids=tokens).logits.float()



@pytest.fixture(scope="module")
def rank():
    with verify.single_rank_group():
        yield


def moe_consolidated(seed: int = 0, tokenizer=None, **changes) -> tuple[torch.nn.Module, Consolidated]:
    """A TP=1, EP=1 megatron MoE GPT with N(0, 0.2) noise on every parameter (norm gains and routers too, so a
    misplaced tensor or expert shows), and its consolidated form."""
    cfg = ModelConfig(**{**TINY_MOE, **changes})
    model_parallel_manual_seed(seed)
    model = get_arch("moe").build_model(cfg, ParallelConfig(), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    full = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    tensors, padding = strip_vocab_padding(full, VOCAB)
    return model, Consolidated(tensors, cfg, None, padding, 3, {"kind": "test"}, tokenizer)


def largelm_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., :VOCAB]


def test_moe_layout_rules_match_megatron_attributes(rank):
    """The expert, shared-expert and router tensors split over tensor-parallel ranks as megatron marks them (what
    the checkpoint reader unshards a TP > 1 MoE checkpoint by), and the layout table's names and shapes."""
    from largelm.model import layout
    from largelm.parallel.sharding import tp_layout

    model, c = moe_consolidated(moe={**MOE, "shared_expert_ffn_size": 16, "layer_freq": 2})
    megatron = tp_layout(model)
    assert any(".local_experts." in n for n in megatron) and any(".shared_experts." in n for n in megatron)
    for name, _ in model.named_parameters():
        assert layout.tp_partition(name, layout.is_gated(c.model)) == megatron.get(name), name
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == layout.param_shapes(c.model, vocab_rows=c.model.padded_vocab_size(1))


@pytest.mark.numerics
def test_moe_exports_as_mixtral_with_equal_logits_and_imports_back_bit_exact(rank, tmp_path, tokenizer_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, MixtralForCausalLM

    model, c = moe_consolidated(tokenizer=tokenizer_path)
    save_consolidated(tmp_path / "hub", c)
    checks = api.export_hf(tmp_path / "hub", tmp_path / "hf", log=lambda *_: None)
    assert checks[0].ok and checks[0].max_abs_logit > 3  # the CLI's own check, logits far from uniform

    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]) == (4, 2, 24)
    assert cfg["num_key_value_heads"] == 2 and cfg["rope_parameters"]["rope_theta"] == 500000.0
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["router_jitter_noise"] == 0.0 and cfg["sliding_window"] is None
    names = load_file(tmp_path / "hf" / "model.safetensors")
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in names  # Mixtral's on-disk names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names

    hf_model, tokens, theirs = mixtral_logits(tmp_path / "hf", c.model)
    ours = largelm_logits(model, tokens)
    assert theirs.shape == ours.shape
    assert max_err(theirs, ours) <= moe_logit_tol(c.model, ours.abs().max().item())

    # a wrong expert order is not within the bound (the check can fail)
    with torch.no_grad():
        experts = hf_model.model.layers[0].mlp.experts
        experts.gate_up_proj.copy_(experts.gate_up_proj.flip(0))
        experts.down_proj.copy_(experts.down_proj.flip(0))
        wrong = hf_model(input_ids=tokens).logits.float()
    assert max_err(wrong, ours) > 1000 * moe_logit_tol(c.model, ours.abs().max().item())

    hf_model = MixtralForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = AutoTokenizer.from_pretrained(tmp_path / "hf")("The quick brown fox", return_tensors="pt")
    generated = hf_model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 6 and int(generated.max()) < VOCAB

    # import back: the consolidated tensors bit-exact, and a second export writes the same file
    api.import_hf(tmp_path / "hf", tmp_path / "hub2", log=lambda *_: None)
    back = load_consolidated(tmp_path / "hub2")
    assert back.model.arch == "moe" and back.model.moe.model_dump(exclude={"router"}) == MOE | {
        "shared_expert_ffn_size": None, "layer_freq": 1}
    assert back.model.moe.router.aux_loss_coeff == c.model.moe.router.aux_loss_coeff  # z-loss: training-only
    assert sorted(back.tensors) == sorted(c.tensors)
    for name, tensor in c.tensors.items():
        assert torch.equal(back.tensors[name], tensor), name
    api.export_hf(tmp_path / "hub2", tmp_path / "hf2", log=lambda *_: None)
    again = load_file(tmp_path / "hf2" / "model.safetensors")
    assert sorted(again) == sorted(names) and all(torch.equal(again[k], names[k]) for k in names)


def test_transformers_mixtral_imports_and_exports_identically(rank, tmp_path):
    """A Mixtral written by transformers itself (tied embeddings, no GQA) -> largelm -> Hugging Face: the same
    tensors, and the import's own logit check passes."""
    from safetensors.torch import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, tie_word_embeddings=True, router_aux_loss_coef=0.02)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.save_pretrained(tmp_path / "hf")
    checks = api.import_hf(tmp_path / "hf", tmp_path / "hub", log=lambda *_: None)
    hub = load_consolidated(tmp_path / "hub")
    assert checks[0].ok and checks[0].max_abs_logit > 3
    assert hub.model.arch == "moe" and hub.model.tie_embeddings and hub.model.moe.ffn_size == 48
    assert hub.model.moe.router.aux_loss_coeff == 0.02
    # transformers' in-memory spelling (fused mlp.experts.gate_up_proj / down_proj, mlp.gate) imports the same
    fused = mixtral.from_hf(hub.model, {k: v.detach() for k, v in model.state_dict().items()})
    assert sorted(fused) == sorted(hub.tensors) and all(torch.equal(fused[k], hub.tensors[k]) for k in fused)
    api.export_hf(tmp_path / "hub", tmp_path / "hf2", log=lambda *_: None)
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("moe_change, field", [
    ({"shared_expert_ffn_size": 16}, "model.moe.shared_expert_ffn_size=16"),
    ({"router": {"capacity_factor": 1.0}}, "model.moe.router.capacity_factor=1.0"),
    ({"layer_freq": 2}, "model.moe.layer_freq=2"),
])
def test_what_mixtral_cannot_compute_is_refused_naming_the_field(rank, tmp_path, moe_change, field):
    _, c = moe_consolidated(moe={**MOE, **moe_change})
    save_consolidated(tmp_path / "hub", c)
    with pytest.raises(UnsupportedArchitecture, match=f"cannot be exported as MixtralForCausalLM: {field}"):
        api.export_hf(tmp_path / "hub", tmp_path / "hf", log=lambda *_: None)
    assert not (tmp_path / "hf" / "model.safetensors").exists()


# --- a checkpoint written by expert-parallel training (slow: 2 gloo ranks) ------------------------------------------
def _train_ep_rank(rank, world_size, config, port):
    """Train with the real Trainer at EP=2; return this rank's live fp32 master weights (expert names made global:
    rank r's local expert e is global expert r x E/EP + e) and the live model's logits on the fixed batch."""
    os.environ["MASTER_PORT"] = str(port)
    from deepspeed.utils import safe_get_full_fp32_param
    from megatron.core import parallel_state

    from largelm.config import load_config
    from largelm.parallel.sharding import global_expert_name
    from largelm.train.preflight import preflight
    from largelm.train.trainer import Trainer

    cfg = preflight(load_config(config), world_size)
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        local = cfg.model.moe.num_experts // cfg.parallel.expert_parallel
        live = {global_expert_name(name, ep_rank, local): safe_get_full_fp32_param(p).detach().float().numpy()
                for name, p in trainer.engine.module.named_parameters()}
        tokens = verify.fixed_tokens(cfg.model)
        trainer.engine.eval()
        with torch.no_grad():
            logits = trainer.engine(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None).float()
        # numpy: torch tensors would travel back as shared-memory handles of a process that has exited
        return {"live": live, "logits": logits[..., :cfg.model.vocab_size].numpy()}
    finally:
        trainer.close()


@pytest.mark.slow
def test_expert_parallel_checkpoint_exports_as_mixtral(tmp_path, tokenizer_path, shard_dir, shard_seq_length):
    """2 steps at EP=2 (DP=2, ZeRO-2: each rank holds 2 of the 4 experts) -> ``largelm-convert export``: every
    expert consolidated from its own rank equals the live fp32 master, transformers' Mixtral logits equal the live
    model's, and it generates."""
    model = {k: v for k, v in TINY_MOE.items() if k not in ("vocab_size", "seq_length")}
    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length, model=model,
                         parallel={"expert_parallel": 2, "zero_stage": 2}, data={"num_workers": 0},
                         train={"steps": 2, "grad_accum_steps": 1},
                         logging={"tensorboard_dir": None, "progress_bar": False, "peak_tflops_per_rank": 1.0})
    results = run_ranks(_train_ep_rank, 2, config, free_port(), timeout_s=120)
    checks = api.export_hf(tmp_path / "ckpt", tmp_path / "hf", log=lambda *_: None)
    assert checks[0].ok

    c = load_consolidated_from_checkpoint(tmp_path / "ckpt")
    for r, result in enumerate(results):
        for name, array in result["live"].items():
            tensor = torch.from_numpy(array)
            ours = c.tensors[name] if name in c.tensors else None
            assert ours is not None, name
            rows = min(ours.shape[0], tensor.shape[0])  # vocabulary padding
            assert torch.equal(ours[:rows], tensor[:rows]), f"rank {r}: {name}"

    hf_model, tokens, theirs = mixtral_logits(tmp_path / "hf", c.model)
    live = torch.from_numpy(results[0]["logits"])
    assert max_err(theirs, live) <= moe_logit_tol(c.model, live.abs().max().item())
    generated = hf_model.generate(tokens[:1, :4], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


def load_consolidated_from_checkpoint(path):
    from largelm.checkpoint.info import inspect_checkpoint
    from largelm.checkpoint.reader import consolidate_checkpoint

    return consolidate_checkpoint(inspect_checkpoint(path), log=lambda *_: None)


def test_reshard_target_of_a_moe_model_is_expert_parallel_1(rank, tmp_path, tokenizer_path, shard_dir,
                                                            shard_seq_length):
    """largelm-convert reshard writes MoE training checkpoints with every expert on each rank: the source's
    expert_parallel is not carried over, and asking for another is refused naming the way there (elastic resume)."""
    from largelm.config import load_config
    from largelm.convert.reshard import target_config
    from largelm.errors import ConversionError

    model = {k: v for k, v in TINY_MOE.items() if k not in ("vocab_size", "seq_length")}
    cfg = load_config(tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length, model=model,
                                  parallel={"expert_parallel": 2, "zero_stage": 2}))
    _, c = moe_consolidated(seq_length=shard_seq_length)
    c.config = cfg
    target = target_config(c, tensor_parallel=1, pipeline_parallel=1, out_root=tmp_path / "out")
    assert target.parallel.expert_parallel == 1 and target.parallel.zero_stage == 2
    with pytest.raises(ConversionError, match="expert_parallel=2: the converter writes MoE .*reshard_on_resume"):
        target_config(c, tensor_parallel=1, pipeline_parallel=1, out_root=tmp_path / "out",
                      overrides=("parallel.expert_parallel=2",))

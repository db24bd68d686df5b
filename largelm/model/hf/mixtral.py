"""largelm MoE GPT (``model.arch: moe``) <-> Hugging Face ``MixtralForCausalLM``.

The layers are llama layers (llama.py: fused QKV <-> q/k/v projections, RMSNorm, RoPE) whose MLP is a sparse MoE
block. Tensors (written in Mixtral's on-disk names, which every Mixtral reader knows; transformers >= 5 fuses
them into ``mlp.experts.gate_up_proj``/``down_proj`` when loading, and import takes either spelling):

* ``mlp.router.weight`` ``[E, h]`` <-> ``block_sparse_moe.gate.weight``;
* expert ``e``'s ``linear_fc1`` = ``[gate; up]`` <-> ``experts.{e}.w1`` (gate) and ``experts.{e}.w3`` (up);
  ``linear_fc2`` <-> ``experts.{e}.w2``. largelm's consolidated weights number experts globally (the checkpoint
  reader joins expert-parallel shards), so ``e`` is the same index on both sides.

Routing: Mixtral takes softmax over the E router logits, the top ``num_experts_per_tok`` probabilities, and
renormalises them to sum 1. megatron's ``TopKRouter`` as largelm configures it (score function softmax, no
pre-softmax, no top-k scaling, no group-limited routing, no expert bias) takes the top-k *logits* and a softmax over
those k, which is the same: ``exp(l_i) / sum_topk exp(l_j)`` both ways, and softmax is monotone, so the same experts
are chosen. Each expert's output is weighted by that probability and summed - no capacity limit in Mixtral.

What Mixtral cannot represent is refused by ``check_exportable`` naming the largelm field: a shared expert, a
capacity factor (token dropping), dense layers between MoE layers (``layer_freq`` != 1). Training-only settings
are not part of the model: the aux-loss coefficient travels as ``router_aux_loss_coef``; z-loss and input jitter
(megatron jitters the router input only, Mixtral the whole block input) are not exported
(``router_jitter_noise`` = 0).
"""

from __future__ import annotations

import torch

from largelm.errors import UnsupportedArchitecture
from largelm.model.hf import llama
from largelm.model.hf.common import Taker

ARCHITECTURE = "MixtralForCausalLM"
MODEL_TYPE = "mixtral"


def architecture() -> str:
    """The transformers class an export is written as."""
    return ARCHITECTURE


def check_exportable(model) -> None:
    """Refuse a largelm MoE model that Mixtral would compute differently, naming the config field."""
    problems = []
    if model.arch != "moe" or model.moe is None:
        problems.append(f"model.arch={model.arch!r} (a Mixtral export is of model.arch='moe')")
    elif model.style != "llama":
        problems.append(f"model.style={model.style!r} (Mixtral layers are llama layers)")
    else:
        moe = model.moe
        if moe.shared_expert_ffn_size is not None:
            problems.append(f"model.moe.shared_expert_ffn_size={moe.shared_expert_ffn_size} (Mixtral has no shared "
                            "expert)")
        if moe.router.capacity_factor is not None:
            problems.append(f"model.moe.router.capacity_factor={moe.router.capacity_factor} (Mixtral never drops "
                            "tokens: export a dropless model, capacity_factor null)")
        if moe.layer_freq != 1:
            problems.append(f"model.moe.layer_freq={moe.layer_freq} (every Mixtral layer is an MoE layer)")
    if problems:
        raise UnsupportedArchitecture("this model cannot be exported as MixtralForCausalLM: " + "; ".join(problems))


def hf_config(model, special_ids: dict, dtype: str) -> dict:
    moe = model.moe
    return dict(
        architectures=[ARCHITECTURE], model_type=MODEL_TYPE, vocab_size=model.vocab_size,
        hidden_size=model.hidden_size, intermediate_size=moe.ffn_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, num_key_value_heads=model.kv_groups,
        head_dim=model.hidden_size // model.num_attention_heads, hidden_act="silu",
        max_position_embeddings=model.positions, rms_norm_eps=model.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_base)}, sliding_window=None,
        attention_dropout=model.attention_dropout, num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.router.aux_loss_coeff, router_jitter_noise=0.0,
        output_router_logits=False, tie_word_embeddings=model.tie_embeddings,
        initializer_range=model.init_method_std, dtype=dtype, **special_ids,
    )


def to_hf(model, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    check_exportable(model)
    return llama.to_hf(model, t, mlp_to_hf=_experts_to_hf)


def _experts_to_hf(model, t: dict[str, torch.Tensor], p: str, h: str) -> dict[str, torch.Tensor]:
    """One layer's router and experts (each a SwiGLU: fused ``[gate; up]`` fc1 -> w1, w3; fc2 -> w2)."""
    out = {h + "block_sparse_moe.gate.weight": t[p + "mlp.router.weight"]}
    for e in range(model.moe.num_experts):
        ours, theirs = f"{p}mlp.experts.local_experts.{e}.", f"{h}block_sparse_moe.experts.{e}."
        gate, up = t[ours + "linear_fc1.weight"].chunk(2, dim=0)
        out[theirs + "w1.weight"], out[theirs + "w3.weight"] = gate, up
        out[theirs + "w2.weight"] = t[ours + "linear_fc2.weight"]
    return out


def model_fields(cfg) -> dict:
    """``transformers`` MixtralConfig -> largelm ModelConfig fields (refusing what largelm cannot compute)."""
    problems = llama.layer_problems(cfg)
    window = getattr(cfg, "sliding_window", None)
    if window is not None and window < cfg.max_position_embeddings:
        problems.append(f"sliding_window={window} < max_position_embeddings={cfg.max_position_embeddings} "
                        "(largelm attends to the whole causal prefix)")
    if problems:
        raise UnsupportedArchitecture("this Mixtral model cannot be represented by largelm: " + "; ".join(problems))
    # router_jitter_noise is training-only and not the same jitter as megatron's (module docstring): not imported
    moe = dict(num_experts=cfg.num_local_experts, top_k=cfg.num_experts_per_tok, ffn_size=cfg.intermediate_size,
               layer_freq=1, router=dict(aux_loss_coeff=float(cfg.router_aux_loss_coef or 0.0),
                                         capacity_factor=None))
    # no dense layer (layer_freq 1): ffn_hidden_size only sizes what would be one, the experts' width
    return dict(llama.shared_model_fields(cfg), arch="moe", ffn_hidden_size=cfg.intermediate_size, moe=moe)


def from_hf(model, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {k.replace(".mlp.gate.", ".block_sparse_moe.gate."): v for k, v in sd.items()}
    return llama.from_hf(model, sd, mlp_from_hf=_experts_from_hf, family="Mixtral")


def _experts_from_hf(model, take: Taker, h: str, p: str) -> dict[str, torch.Tensor]:
    """``_experts_to_hf`` inverted; also reads transformers' in-memory spelling (one fused [E, 2F, h] tensor)."""
    experts = model.moe.num_experts
    out = {p + "mlp.router.weight": take(h + "block_sparse_moe.gate.weight")}
    fused = h + "mlp.experts.gate_up_proj"
    if fused in take.sd:
        gate_up, down = take(fused), take(h + "mlp.experts.down_proj")
        if gate_up.shape[0] != experts or down.shape[0] != experts:
            raise UnsupportedArchitecture(f"{fused} holds {gate_up.shape[0]} experts, num_local_experts is "
                                          f"{experts}")
        fc1, fc2 = list(gate_up.unbind(0)), list(down.unbind(0))
    else:
        fc1, fc2 = [], []
        for e in range(experts):
            theirs = f"{h}block_sparse_moe.experts.{e}."
            fc1.append(torch.cat([take(theirs + "w1.weight"), take(theirs + "w3.weight")]))
            fc2.append(take(theirs + "w2.weight"))
    for e in range(experts):
        ours = f"{p}mlp.experts.local_experts.{e}."
        out[ours + "linear_fc1.weight"], out[ours + "linear_fc2.weight"] = fc1[e], fc2[e]
    return out

"""largelm llama style <-> Hugging Face ``LlamaForCausalLM``.

* ``linear_qkv`` (per query group ``[q_1..q_r, k, v]``) <-> ``q_proj``, ``k_proj``, ``v_proj`` (GQA:
  ``num_key_value_heads`` = query groups). No row permutation is needed for RoPE: megatron (non-interleaved)
  and Hugging Face Llama both rotate halves of the head dimension (``rotate_half``).
* ``linear_fc1`` = ``[gate; up]`` <-> ``gate_proj``, ``up_proj``; ``linear_fc2`` <-> ``down_proj``.
* RMSNorm epsilon <-> ``rms_norm_eps``; rotary base <-> ``rope_parameters.rope_theta`` (only the default RoPE:
  scaled variants are refused); tied output <-> ``tie_word_embeddings``.
"""

from __future__ import annotations

import torch

from largelm.errors import UnsupportedArchitecture
from largelm.model.hf.common import Taker, finish_import
from largelm.model.hf.qkv import fuse_qkv, split_qkv

ARCHITECTURE = "LlamaForCausalLM"
MODEL_TYPE = "llama"
IGNORED_KEYS = (".rotary_emb.inv_freq",)  # a buffer in old Llama checkpoints


def architecture() -> str:
    """The transformers class an export is written as."""
    return ARCHITECTURE


def check_exportable(model) -> None:
    pass  # every llama-style largelm model is a LlamaForCausalLM


def hf_config(model, special_ids: dict, dtype: str) -> dict:
    return dict(
        architectures=[ARCHITECTURE], model_type=MODEL_TYPE, vocab_size=model.vocab_size,
        hidden_size=model.hidden_size, intermediate_size=model.ffn_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, num_key_value_heads=model.kv_groups,
        head_dim=model.hidden_size // model.num_attention_heads, hidden_act="silu",
        max_position_embeddings=model.positions, rms_norm_eps=model.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(model.rotary_base)},
        attention_bias=False, attention_dropout=model.attention_dropout, mlp_bias=False, pretraining_tp=1,
        tie_word_embeddings=model.tie_embeddings, initializer_range=model.init_method_std, dtype=dtype,
        **special_ids,
    )


def to_hf(model, t: dict[str, torch.Tensor], mlp_to_hf=None) -> dict[str, torch.Tensor]:
    """largelm -> Hugging Face names for a llama-family model; ``mlp_to_hf(model, t, p, h)`` maps one layer's MLP
    (default: Llama's dense SwiGLU; Mixtral passes its experts')."""
    mlp_to_hf = mlp_to_hf or dense_mlp_to_hf
    out = {"model.embed_tokens.weight": t["embedding.word_embeddings.weight"]}
    for i in range(model.num_layers):
        p, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        out.update(attention_to_hf(model, t, p, h))
        out.update(mlp_to_hf(model, t, p, h))
    out["model.norm.weight"] = t["decoder.final_layernorm.weight"]
    if not model.tie_embeddings:
        out["lm_head.weight"] = t["output_layer.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def dense_mlp_to_hf(model, t: dict[str, torch.Tensor], p: str, h: str) -> dict[str, torch.Tensor]:
    """One layer's SwiGLU MLP: megatron's fused ``[gate; up]`` fc1 -> gate_proj, up_proj; fc2 -> down_proj."""
    gate, up = t[p + "mlp.linear_fc1.weight"].chunk(2, dim=0)
    return {h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
            h + "mlp.down_proj.weight": t[p + "mlp.linear_fc2.weight"]}


def model_fields(cfg) -> dict:
    """``transformers`` LlamaConfig -> largelm ModelConfig fields (refusing what largelm cannot compute)."""
    problems = layer_problems(cfg)
    if problems:
        raise UnsupportedArchitecture("this Llama model cannot be represented by largelm: " + "; ".join(problems))
    return dict(shared_model_fields(cfg), ffn_hidden_size=cfg.intermediate_size)


def layer_problems(cfg) -> list[str]:
    """What a llama-family ``transformers`` config (Llama, Mixtral) sets that largelm's llama layers cannot
    compute (each naming the Hugging Face field)."""
    problems = []
    if cfg.hidden_act != "silu":
        problems.append(f"hidden_act={cfg.hidden_act!r} (largelm's SwiGLU uses silu)")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        problems.append("attention_bias/mlp_bias (largelm's llama style has no biases)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        problems.append(f"head_dim={head_dim} x num_attention_heads={cfg.num_attention_heads} != hidden_size="
                        f"{cfg.hidden_size} (largelm uses hidden_size / heads)")
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope_type={rope_type!r} (only unscaled RoPE is implemented)")
    if (getattr(cfg, "pretraining_tp", 1) or 1) != 1:
        problems.append(f"pretraining_tp={cfg.pretraining_tp}")
    return problems


def shared_model_fields(cfg) -> dict:
    """The largelm ModelConfig fields of a llama-family ``transformers`` config, but the MLP's."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    return dict(style="llama", num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                num_attention_heads=cfg.num_attention_heads,
                num_query_groups=None if kv == cfg.num_attention_heads else kv,
                max_position_embeddings=cfg.max_position_embeddings,
                vocab_size=cfg.vocab_size, tie_embeddings=bool(cfg.tie_word_embeddings), rotary_base=float(theta),
                norm_epsilon=cfg.rms_norm_eps, hidden_dropout=0.0,
                attention_dropout=float(cfg.attention_dropout or 0.0), init_method_std=cfg.initializer_range)


def from_hf(model, sd: dict[str, torch.Tensor], mlp_from_hf=None, family: str = "Llama") -> dict[str, torch.Tensor]:
    """``to_hf`` inverted; ``mlp_from_hf(model, take, h, p)`` maps one layer's MLP (default: dense SwiGLU)."""
    mlp_from_hf = mlp_from_hf or dense_mlp_from_hf
    sd = {k: v for k, v in sd.items() if not k.endswith(IGNORED_KEYS)}
    take = Taker(sd, family)
    out = {"embedding.word_embeddings.weight": take("model.embed_tokens.weight")}
    for i in range(model.num_layers):
        h, p = f"model.layers.{i}.", f"decoder.layers.{i}."
        out.update(attention_from_hf(model, take, h, p))
        out.update(mlp_from_hf(model, take, h, p))
    out["decoder.final_layernorm.weight"] = take("model.norm.weight")
    return finish_import(out, take, model.tie_embeddings, "embed_tokens")


def dense_mlp_from_hf(model, take: Taker, h: str, p: str) -> dict[str, torch.Tensor]:
    """``dense_mlp_to_hf`` inverted."""
    return {p + "mlp.linear_fc1.weight": torch.cat([take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")]),
            p + "mlp.linear_fc2.weight": take(h + "mlp.down_proj.weight")}


def attention_to_hf(model, t: dict[str, torch.Tensor], p: str, h: str) -> dict[str, torch.Tensor]:
    """Layer prefix ``p`` (largelm) -> ``h`` (Hugging Face): the two norms and the attention projections, which
    every llama-family layer (Llama, Mixtral) shares."""
    nq, ng = model.num_attention_heads, model.kv_groups
    q, k, v = split_qkv(t[p + "self_attention.linear_qkv.weight"], nq, ng, model.hidden_size // nq)
    out = {f"{h}self_attn.{name}_proj.weight": w for name, w in (("q", q), ("k", k), ("v", v))}
    out[h + "input_layernorm.weight"] = t[p + "input_layernorm.weight"]
    out[h + "self_attn.o_proj.weight"] = t[p + "self_attention.linear_proj.weight"]
    out[h + "post_attention_layernorm.weight"] = t[p + "pre_mlp_layernorm.weight"]
    return out


def attention_from_hf(model, take: Taker, h: str, p: str) -> dict[str, torch.Tensor]:
    """``attention_to_hf`` inverted."""
    nq, ng = model.num_attention_heads, model.kv_groups
    return {
        p + "input_layernorm.weight": take(h + "input_layernorm.weight"),
        p + "self_attention.linear_qkv.weight": fuse_qkv(
            take(h + "self_attn.q_proj.weight"), take(h + "self_attn.k_proj.weight"),
            take(h + "self_attn.v_proj.weight"), nq, ng, model.hidden_size // nq),
        p + "self_attention.linear_proj.weight": take(h + "self_attn.o_proj.weight"),
        p + "pre_mlp_layernorm.weight": take(h + "post_attention_layernorm.weight"),
    }

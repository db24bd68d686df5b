"""largelm gpt2 style <-> Hugging Face ``GPT2LMHeadModel``.

Layout differences handled here:

* GPT-2 uses ``Conv1D`` layers whose weight is ``[in, out]`` (y = x W + b): every linear weight is transposed.
* ``c_attn`` is one ``[h, 3h]`` block ``[Q | K | V]`` (each h columns, heads in order); megatron's ``linear_qkv``
  interleaves per head ``[q_h; k_h; v_h]`` (query groups of one head: GPT-2 has no GQA).
* ``lm_head`` is tied to ``wte`` unless ``tie_word_embeddings`` is false.
* Activation ``"gelu"`` is exact erf GeLU, what largelm computes; OpenAI's checkpoints use ``"gelu_new"`` (the
  tanh approximation), which largelm's gpt2 style does not compute, so importing those is refused.
"""

from __future__ import annotations

import torch

from largelm.errors import UnsupportedArchitecture
from largelm.model.hf.common import Taker, finish_import
from largelm.model.hf.qkv import fuse_qkv, split_qkv

ARCHITECTURE = "GPT2LMHeadModel"
MODEL_TYPE = "gpt2"
IGNORED_KEYS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old GPT-2 checkpoints


def architecture() -> str:
    """The transformers class an export is written as."""
    return ARCHITECTURE


def check_exportable(model) -> None:
    if model.kv_groups != model.num_attention_heads:
        raise UnsupportedArchitecture(
            f"GPT2LMHeadModel cannot represent grouped-query attention (num_query_groups={model.num_query_groups}, "
            f"num_attention_heads={model.num_attention_heads})")


def hf_config(model, special_ids: dict, dtype: str) -> dict:
    return dict(
        architectures=[ARCHITECTURE], model_type=MODEL_TYPE, vocab_size=model.vocab_size,
        n_positions=model.positions, n_embd=model.hidden_size, n_layer=model.num_layers,
        n_head=model.num_attention_heads, n_inner=None if model.ffn_size == 4 * model.hidden_size else model.ffn_size,
        activation_function="gelu",
        resid_pdrop=model.hidden_dropout, embd_pdrop=model.hidden_dropout, attn_pdrop=model.attention_dropout,
        layer_norm_epsilon=model.norm_epsilon, initializer_range=model.init_method_std, scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, add_cross_attention=False,
        tie_word_embeddings=model.tie_embeddings, dtype=dtype, **special_ids,
    )


def to_hf(model, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Consolidated GPTModel tensors -> GPT2LMHeadModel state dict."""
    check_exportable(model)
    nq = model.num_attention_heads
    d = model.hidden_size // nq
    out = {"transformer.wte.weight": t["embedding.word_embeddings.weight"],
           "transformer.wpe.weight": t["embedding.position_embeddings.weight"]}
    for i in range(model.num_layers):
        p, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
        out[h + "ln_1.weight"] = t[p + "input_layernorm.weight"]
        out[h + "ln_1.bias"] = t[p + "input_layernorm.bias"]
        q, k, v = split_qkv(t[p + "self_attention.linear_qkv.weight"], nq, nq, d)
        out[h + "attn.c_attn.weight"] = torch.cat([q, k, v], dim=0).t()
        q, k, v = split_qkv(t[p + "self_attention.linear_qkv.bias"], nq, nq, d)
        out[h + "attn.c_attn.bias"] = torch.cat([q, k, v], dim=0)
        out[h + "attn.c_proj.weight"] = t[p + "self_attention.linear_proj.weight"].t()
        out[h + "attn.c_proj.bias"] = t[p + "self_attention.linear_proj.bias"]
        out[h + "ln_2.weight"] = t[p + "pre_mlp_layernorm.weight"]
        out[h + "ln_2.bias"] = t[p + "pre_mlp_layernorm.bias"]
        out[h + "mlp.c_fc.weight"] = t[p + "mlp.linear_fc1.weight"].t()
        out[h + "mlp.c_fc.bias"] = t[p + "mlp.linear_fc1.bias"]
        out[h + "mlp.c_proj.weight"] = t[p + "mlp.linear_fc2.weight"].t()
        out[h + "mlp.c_proj.bias"] = t[p + "mlp.linear_fc2.bias"]
    out["transformer.ln_f.weight"] = t["decoder.final_layernorm.weight"]
    out["transformer.ln_f.bias"] = t["decoder.final_layernorm.bias"]
    if not model.tie_embeddings:
        out["lm_head.weight"] = t["output_layer.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def model_fields(cfg) -> dict:
    """``transformers`` GPT2Config -> largelm ModelConfig fields (refusing what largelm cannot compute)."""
    if cfg.activation_function != "gelu":
        raise UnsupportedArchitecture(
            f"activation_function={cfg.activation_function!r}: largelm's gpt2 style computes exact (erf) GeLU, i.e. "
            "'gelu'; the tanh approximation ('gelu_new', OpenAI's GPT-2) would change the model's outputs")
    if not cfg.scale_attn_weights or cfg.scale_attn_by_inverse_layer_idx:
        raise UnsupportedArchitecture("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
    if getattr(cfg, "add_cross_attention", False):
        raise UnsupportedArchitecture("GPT-2 with cross-attention is not a decoder-only LM")
    return dict(style="gpt2", num_layers=cfg.n_layer, hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head,
                num_query_groups=None, ffn_hidden_size=cfg.n_inner,  # None: 4 x hidden, as in GPT-2
                max_position_embeddings=cfg.n_positions, vocab_size=cfg.vocab_size,
                tie_embeddings=bool(cfg.tie_word_embeddings), norm_epsilon=cfg.layer_norm_epsilon,
                hidden_dropout=cfg.resid_pdrop, attention_dropout=cfg.attn_pdrop,
                init_method_std=cfg.initializer_range)


def from_hf(model, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel (or GPT2Model) state dict -> consolidated GPTModel tensors. Every tensor must be used."""
    sd = {}
    for key, value in hf.items():
        if key.endswith(IGNORED_KEYS):
            continue
        sd[key[len("transformer."):] if key.startswith("transformer.") else key] = value
    take = Taker(sd, "GPT-2")

    nq = model.num_attention_heads
    d = model.hidden_size // nq
    h = model.hidden_size
    out = {"embedding.word_embeddings.weight": take("wte.weight"),
           "embedding.position_embeddings.weight": take("wpe.weight")}
    for i in range(model.num_layers):
        p, g = f"h.{i}.", f"decoder.layers.{i}."
        out[g + "input_layernorm.weight"] = take(p + "ln_1.weight")
        out[g + "input_layernorm.bias"] = take(p + "ln_1.bias")
        q, k, v = take(p + "attn.c_attn.weight").t().split(h, dim=0)
        out[g + "self_attention.linear_qkv.weight"] = fuse_qkv(q, k, v, nq, nq, d)
        q, k, v = take(p + "attn.c_attn.bias").split(h, dim=0)
        out[g + "self_attention.linear_qkv.bias"] = fuse_qkv(q, k, v, nq, nq, d)
        out[g + "self_attention.linear_proj.weight"] = take(p + "attn.c_proj.weight").t()
        out[g + "self_attention.linear_proj.bias"] = take(p + "attn.c_proj.bias")
        out[g + "pre_mlp_layernorm.weight"] = take(p + "ln_2.weight")
        out[g + "pre_mlp_layernorm.bias"] = take(p + "ln_2.bias")
        out[g + "mlp.linear_fc1.weight"] = take(p + "mlp.c_fc.weight").t()
        out[g + "mlp.linear_fc1.bias"] = take(p + "mlp.c_fc.bias")
        out[g + "mlp.linear_fc2.weight"] = take(p + "mlp.c_proj.weight").t()
        out[g + "mlp.linear_fc2.bias"] = take(p + "mlp.c_proj.bias")
    out["decoder.final_layernorm.weight"] = take("ln_f.weight")
    out["decoder.final_layernorm.bias"] = take("ln_f.bias")
    return finish_import(out, take, model.tie_embeddings, "wte.weight")

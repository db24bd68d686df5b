"""A plain-PyTorch GPT (nanoGPT-style) that computes exactly what largelm's megatron GPTModel computes.

Test-only: it is the independent statement of the model the megatron build must match, and its
``load_from_megatron`` documents megatron-core's parameter layout (the HF exporter reuses this).

Styles (largelm.config.ModelConfig.style):
  gpt2  - LayerNorm (with bias), learned absolute positions, exact (erf) GeLU MLP, biases on every
          linear layer, pre-norm blocks, final LayerNorm.
  llama - RMSNorm (weight only), rotary positions, SwiGLU MLP, no biases, grouped-query attention.
Both: causal self-attention with softmax scale 1/sqrt(head_dim); tied or untied output projection.

megatron-core (0.16.1, TP=1) state-dict names -> this model:
  embedding.word_embeddings.weight                [V, h]    -> wte.weight
  embedding.position_embeddings.weight            [P, h]    -> wpe.weight            (gpt2 only)
  decoder.layers.{i}.input_layernorm.{weight,bias}          -> blocks[i].ln_1        (bias: gpt2)
  decoder.layers.{i}.self_attention.linear_qkv.{weight,bias} [(nq + 2*ng)*d, h]
        rows grouped per query group g = 0..ng-1:  [q heads g*r .. g*r+r-1 | k_g | v_g], r = nq/ng,
        each head d rows                                    -> blocks[i].attn.{q,k,v}_proj
  decoder.layers.{i}.self_attention.linear_proj.{weight,bias} [h, nq*d] -> blocks[i].attn.out_proj
  decoder.layers.{i}.pre_mlp_layernorm.{weight,bias}        -> blocks[i].ln_2
  decoder.layers.{i}.mlp.linear_fc1.{weight,bias}  gpt2: [ffn, h]    -> blocks[i].mlp.fc
                                                   llama: [2*ffn, h] = [gate; up]
                                                                     -> blocks[i].mlp.{gate,up}_proj
  decoder.layers.{i}.mlp.linear_fc2.{weight,bias}  [h, ffn]  -> blocks[i].mlp.out_proj
  decoder.final_layernorm.{weight,bias}                      -> ln_f
  output_layer.weight                              [V, h]    -> lm_head.weight (untied only; when
        tied, megatron stores no output weight and uses embedding.word_embeddings.weight)
  *._extra_state                                             -> ignored (Transformer-Engine/FP8 slot)
Rotary: megatron's non-interleaved convention (rotate_half): the head dim is split into halves
[x1, x2]; frequency i in 0..d/2-1 rotates the pair (x1[i], x2[i]); inv_freq_i = base^(-2i/d).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RefConfig:
    style: str  # "gpt2" | "llama"
    vocab_size: int  # the padded size megatron uses
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_groups: int
    ffn_size: int
    max_positions: int
    norm_eps: float
    rotary_base: float
    tie_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_model_config(cls, cfg, padded_vocab_size: int) -> "RefConfig":
        return cls(
            style=cfg.style,
            vocab_size=padded_vocab_size,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_groups=cfg.kv_groups,
            ffn_size=cfg.ffn_size,
            max_positions=cfg.positions,
            norm_eps=cfg.norm_epsilon,
            rotary_base=cfg.rotary_base,
            tie_embeddings=cfg.tie_embeddings,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(cfg: RefConfig) -> nn.Module:
    if cfg.style == "llama":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(seq_len: int, head_dim: int, base: float):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # [s, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [s, d]
    return emb.cos(), emb.sin()


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.cfg = cfg
        d, bias = cfg.head_dim, cfg.style == "gpt2"
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_groups * d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_groups * d, bias=bias)
        self.out_proj = nn.Linear(cfg.num_heads * d, cfg.hidden_size, bias=bias)

    def forward(self, x):  # x [b, s, h]
        cfg, (b, s, _) = self.cfg, x.shape
        d = cfg.head_dim
        q = self.q_proj(x).view(b, s, cfg.num_heads, d).transpose(1, 2)  # [b, nq, s, d]
        k = self.k_proj(x).view(b, s, cfg.num_kv_groups, d).transpose(1, 2)  # [b, ng, s, d]
        v = self.v_proj(x).view(b, s, cfg.num_kv_groups, d).transpose(1, 2)
        if cfg.style == "llama":
            cos, sin = rope_cos_sin(s, d, cfg.rotary_base)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        # GQA: query head j reads kv group j // (nq / ng)
        k = k.repeat_interleave(cfg.num_heads // cfg.num_kv_groups, dim=1)
        v = v.repeat_interleave(cfg.num_heads // cfg.num_kv_groups, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d)
        causal = torch.ones(s, s, dtype=torch.bool).triu(diagonal=1)
        att = att.masked_fill(causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, cfg.num_heads * d)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.style = cfg.style
        h, f = cfg.hidden_size, cfg.ffn_size
        if cfg.style == "llama":
            self.gate_proj = nn.Linear(h, f, bias=False)
            self.up_proj = nn.Linear(h, f, bias=False)
            self.out_proj = nn.Linear(f, h, bias=False)
        else:
            self.fc = nn.Linear(h, f)
            self.out_proj = nn.Linear(f, h)

    def forward(self, x):
        if self.style == "llama":
            return self.out_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.out_proj(F.gelu(self.fc(x)))  # exact erf GeLU, as megatron's unfused F.gelu


class Block(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.ln_1, self.attn = make_norm(cfg), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ReferenceGPT(nn.Module):
    def __init__(self, cfg: RefConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.hidden_size) if cfg.style == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = make_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [b, s] -> logits [b, s, V]."""
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return x @ weight.t()

    def per_token_loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)

    # -- weights from megatron ------------------------------------------------------------------------
    @torch.no_grad()
    def load_from_megatron(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy a TP=1 megatron GPTModel state dict into this model (strict: every tensor is used)."""
        cfg = self.cfg
        sd = {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}
        used: set[str] = set()

        def take(name: str) -> torch.Tensor:
            used.add(name)
            return sd[name]

        def norm(dst: nn.Module, prefix: str) -> None:
            dst.weight.copy_(take(prefix + ".weight"))
            if cfg.style == "gpt2":
                dst.bias.copy_(take(prefix + ".bias"))

        self.wte.weight.copy_(take("embedding.word_embeddings.weight"))
        if self.wpe is not None:
            self.wpe.weight.copy_(take("embedding.position_embeddings.weight"))
        for i, block in enumerate(self.blocks):
            p = f"decoder.layers.{i}."
            norm(block.ln_1, p + "input_layernorm")
            norm(block.ln_2, p + "pre_mlp_layernorm")
            q, k, v = split_megatron_qkv(take(p + "self_attention.linear_qkv.weight"), cfg)
            block.attn.q_proj.weight.copy_(q), block.attn.k_proj.weight.copy_(k), block.attn.v_proj.weight.copy_(v)
            block.attn.out_proj.weight.copy_(take(p + "self_attention.linear_proj.weight"))
            fc1 = take(p + "mlp.linear_fc1.weight")
            if cfg.style == "llama":
                gate, up = fc1.chunk(2, dim=0)  # megatron's GLU: act(first half) * second half
                block.mlp.gate_proj.weight.copy_(gate), block.mlp.up_proj.weight.copy_(up)
            else:
                block.mlp.fc.weight.copy_(fc1)
            block.mlp.out_proj.weight.copy_(take(p + "mlp.linear_fc2.weight"))
            if cfg.style == "gpt2":
                q, k, v = split_megatron_qkv(take(p + "self_attention.linear_qkv.bias"), cfg)
                block.attn.q_proj.bias.copy_(q), block.attn.k_proj.bias.copy_(k), block.attn.v_proj.bias.copy_(v)
                block.attn.out_proj.bias.copy_(take(p + "self_attention.linear_proj.bias"))
                block.mlp.fc.bias.copy_(take(p + "mlp.linear_fc1.bias"))
                block.mlp.out_proj.bias.copy_(take(p + "mlp.linear_fc2.bias"))
        norm(self.ln_f, "decoder.final_layernorm")
        if self.lm_head is not None:
            self.lm_head.weight.copy_(take("output_layer.weight"))
        unused = sorted(set(sd) - used)
        if unused:
            raise KeyError(f"megatron tensors not mapped: {unused}")


def split_megatron_qkv(fused: torch.Tensor, cfg: RefConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused QKV weight [(nq + 2 ng) d, h] (or bias [(nq + 2 ng) d]) -> q [nq d, ...],
    k [ng d, ...], v [ng d, ...]. Rows are grouped per query group: [q_g1..q_gr, k_g, v_g]."""
    ng, d, r = cfg.num_kv_groups, cfg.head_dim, cfg.num_heads // cfg.num_kv_groups
    grouped = fused.reshape(ng, (r + 2) * d, *fused.shape[1:])
    q, k, v = grouped.split([r * d, d, d], dim=1)
    rest = fused.shape[1:]
    return q.reshape(ng * r * d, *rest), k.reshape(ng * d, *rest), v.reshape(ng * d, *rest)

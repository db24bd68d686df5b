"""largelm BERT (megatron ``BertModel``) <-> Hugging Face BERT, both directions from one name table.

Which transformers class depends on where the residual connections start (``bert.residual_post_layernorm``,
largelm/model/bert_layers.py):

* ``true`` (original, post-LN BERT) <-> ``BertForPreTraining`` (binary head) / ``BertForMaskedLM`` (none),
  ``model_type: bert``. largelm's LayerNorms sit one slot earlier than BERT's: layer 0's ``input_norm`` is
  ``bert.embeddings.LayerNorm``, layer i's ``mlp_norm`` is layer i's ``attention.output.LayerNorm``, layer i+1's
  ``input_norm`` (the final LayerNorm after the last layer) is layer i's ``output.LayerNorm``.
* ``false`` (megatron's pre-LN BERT) <-> ``MegatronBertForPreTraining`` / ``MegatronBertForMaskedLM``
  (``model_type: megatron-bert``): ``attention.ln``, ``ln`` and ``bert.encoder.ln``. ``BertForMaskedLM`` cannot
  compute a pre-LN network; this is the class transformers has for Megatron's BERT.

Either way ``AutoModelForMaskedLM`` loads the export (with a binary head it ignores ``bert.pooler`` and
``cls.seq_relationship``; ``AutoModelForPreTraining`` keeps them). Shared layout: fused per-head QKV <->
``attention.self.{query,key,value}``; ``linear_proj`` <-> ``attention.output.dense``; ``linear_fc1/fc2`` <->
``intermediate.dense``/``output.dense``; ``lm_head.{dense,layer_norm}`` <-> ``cls.predictions.transform``;
``output_layer.bias`` <-> ``cls.predictions.bias`` (and ``cls.predictions.decoder.bias``, which transformers ties to
it only with tied embeddings); an untied output weight <-> ``cls.predictions.decoder.weight``; ``pooler.dense``
<-> ``bert.pooler.dense``; ``binary_head`` <-> ``cls.seq_relationship`` (index 0 = "in order" for SOP, "is
next" for NSP, as largelm's data writes them).
Activation ``gelu`` (exact erf GeLU) is what largelm computes; other activations are refused on import.
"""

from __future__ import annotations

import torch

from largelm.config import BertConfig
from largelm.errors import UnsupportedArchitecture
from largelm.model.hf.qkv import fuse_qkv, split_qkv

MODEL_TYPES = {True: "bert", False: "megatron-bert"}  # keyed by residual_post_layernorm
CLASS_PREFIX = {True: "Bert", False: "MegatronBert"}


def architecture(bert: BertConfig) -> str:
    head = "ForPreTraining" if bert.binary_head else "ForMaskedLM"
    return CLASS_PREFIX[bert.residual_post_layernorm] + head


def check_exportable(model) -> None:
    if model.kv_groups != model.num_attention_heads:
        raise UnsupportedArchitecture("Hugging Face BERT cannot represent grouped-query attention "
                                      f"(num_query_groups={model.kv_groups}, heads={model.num_attention_heads})")


def _pairs(model, bert: BertConfig) -> list[tuple[str, str]]:
    """(largelm name, Hugging Face name) of every tensor but the fused QKV."""
    post, L = bert.residual_post_layernorm, model.num_layers
    pairs = [("embedding.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"),
             ("embedding.position_embeddings.weight", "bert.embeddings.position_embeddings.weight"),
             ("embedding.tokentype_embeddings.weight", "bert.embeddings.token_type_embeddings.weight")]

    def both(ours: str, theirs: str) -> None:
        pairs.extend([(ours + ".weight", theirs + ".weight"), (ours + ".bias", theirs + ".bias")])

    for i in range(L):
        e, h = f"encoder.layers.{i}.", f"bert.encoder.layer.{i}."
        if post:
            both(e + "input_norm", f"bert.encoder.layer.{i - 1}.output.LayerNorm" if i else "bert.embeddings.LayerNorm")
            both(e + "mlp_norm", h + "attention.output.LayerNorm")
        else:
            both(e + "input_layernorm", h + "attention.ln")
            both(e + "pre_mlp_layernorm", h + "ln")
        both(e + "self_attention.linear_proj", h + "attention.output.dense")
        both(e + "mlp.linear_fc1", h + "intermediate.dense")
        both(e + "mlp.linear_fc2", h + "output.dense")
    both("encoder.final_layernorm", f"bert.encoder.layer.{L - 1}.output.LayerNorm" if post else "bert.encoder.ln")
    both("lm_head.dense", "cls.predictions.transform.dense")
    both("lm_head.layer_norm", "cls.predictions.transform.LayerNorm")
    pairs.append(("output_layer.bias", "cls.predictions.bias"))
    if not model.tie_embeddings:
        pairs.append(("output_layer.weight", "cls.predictions.decoder.weight"))
    if bert.binary_head:
        both("pooler.dense", "bert.pooler.dense")
        both("binary_head", "cls.seq_relationship")
    return pairs


def _qkv_names(i: int) -> tuple[str, str]:
    return f"encoder.layers.{i}.self_attention.linear_qkv", f"bert.encoder.layer.{i}.attention.self."


def to_hf(model, t: dict[str, torch.Tensor], bert: BertConfig) -> dict[str, torch.Tensor]:
    """Consolidated BertModel tensors -> the Hugging Face class's state dict (``architecture(bert)``)."""
    check_exportable(model)
    nq = model.num_attention_heads
    d = model.hidden_size // nq
    out = {theirs: t[ours] for ours, theirs in _pairs(model, bert)}
    if not model.tie_embeddings:  # transformers ties the decoder's bias to cls.predictions.bias only when tied
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"].clone()
    for i in range(model.num_layers):
        ours, theirs = _qkv_names(i)
        for kind in ("weight", "bias"):
            for name, part in zip(("query", "key", "value"), split_qkv(t[f"{ours}.{kind}"], nq, nq, d)):
                out[f"{theirs}{name}.{kind}"] = part
    return {k: v.contiguous() for k, v in out.items()}


def hf_config(model, special_ids: dict, dtype: str, bert: BertConfig) -> dict:
    fields = dict(
        architectures=[architecture(bert)], model_type=MODEL_TYPES[bert.residual_post_layernorm],
        vocab_size=model.vocab_size, hidden_size=model.hidden_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, intermediate_size=model.ffn_size, hidden_act="gelu",
        hidden_dropout_prob=model.hidden_dropout, attention_probs_dropout_prob=model.attention_dropout,
        max_position_embeddings=model.positions, type_vocab_size=2, initializer_range=model.init_method_std,
        layer_norm_eps=model.norm_epsilon, tie_word_embeddings=model.tie_embeddings, dtype=dtype,
        pad_token_id=special_ids.get("pad_token_id"),
    )
    if bert.residual_post_layernorm:
        fields["position_embedding_type"] = "absolute"
    return fields


def model_fields(cfg) -> dict:
    """``transformers`` BertConfig / MegatronBertConfig -> largelm ModelConfig fields."""
    if cfg.hidden_act != "gelu":
        raise UnsupportedArchitecture(f"hidden_act={cfg.hidden_act!r}: largelm's BERT computes exact (erf) GeLU "
                                      "('gelu')")
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedArchitecture(f"position_embedding_type={cfg.position_embedding_type!r}: largelm's BERT has "
                                      "learned absolute positions")
    if cfg.type_vocab_size != 2:
        raise UnsupportedArchitecture(f"type_vocab_size={cfg.type_vocab_size}: largelm's BERT has 2 token types")
    if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
        raise UnsupportedArchitecture("a BERT decoder / cross-attention model is not an encoder for MLM pretraining")
    return dict(arch="bert", style="gpt2", num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
                num_attention_heads=cfg.num_attention_heads, num_query_groups=None,
                ffn_hidden_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                vocab_size=cfg.vocab_size, tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", True)),
                norm_epsilon=cfg.layer_norm_eps, hidden_dropout=cfg.hidden_dropout_prob,
                attention_dropout=cfg.attention_probs_dropout_prob, init_method_std=cfg.initializer_range)


def config_section(cfg, hf: dict[str, torch.Tensor]) -> BertConfig:
    """The BertConfig fields the weights decide: the norm placement (model_type) and the binary head."""
    post = cfg.model_type == "bert"
    binary = "cls.seq_relationship.weight" in hf
    if binary != ("bert.pooler.dense.weight" in hf):
        raise UnsupportedArchitecture("the weights have only one of bert.pooler and cls.seq_relationship; largelm's "
                                      "binary head needs both (or neither)")
    return BertConfig(residual_post_layernorm=post, binary_head=binary)


def from_hf(model, hf: dict[str, torch.Tensor], bert: BertConfig) -> dict[str, torch.Tensor]:
    """Hugging Face BERT state dict -> consolidated BertModel tensors. Every tensor must be used."""
    if "cls.predictions.bias" not in hf:
        raise UnsupportedArchitecture("the weights have no MLM head (cls.predictions): export from BertForMaskedLM "
                                      "or BertForPreTraining, not BertModel")
    hf = dict(hf)
    decoder_bias = hf.pop("cls.predictions.decoder.bias", None)  # tied to cls.predictions.bias when saved
    if decoder_bias is not None and not torch.equal(decoder_bias, hf["cls.predictions.bias"]):
        raise UnsupportedArchitecture("cls.predictions.decoder.bias differs from cls.predictions.bias")
    if model.tie_embeddings and "cls.predictions.decoder.weight" in hf:
        if not torch.equal(hf.pop("cls.predictions.decoder.weight"), hf["bert.embeddings.word_embeddings.weight"]):
            raise UnsupportedArchitecture("tie_word_embeddings is true but cls.predictions.decoder.weight differs "
                                          "from bert.embeddings.word_embeddings.weight")
    hf.pop("bert.embeddings.position_ids", None)  # a buffer in old checkpoints
    pairs = _pairs(model, bert)
    missing = [theirs for _, theirs in pairs if theirs not in hf]
    if missing:
        raise UnsupportedArchitecture(f"Hugging Face BERT weights lack {missing[:6]}")
    out = {ours: hf[theirs] for ours, theirs in pairs}
    used = {theirs for _, theirs in pairs}
    nq = model.num_attention_heads
    d = model.hidden_size // nq
    for i in range(model.num_layers):
        ours, theirs = _qkv_names(i)
        for kind in ("weight", "bias"):
            names = [f"{theirs}{n}.{kind}" for n in ("query", "key", "value")]
            absent = [n for n in names if n not in hf]
            if absent:
                raise UnsupportedArchitecture(f"Hugging Face BERT weights lack {absent}")
            out[f"{ours}.{kind}"] = fuse_qkv(*(hf[n] for n in names), nq, nq, d)
            used.update(names)
    unused = sorted(set(hf) - used)
    if unused:
        raise UnsupportedArchitecture(f"Hugging Face BERT tensors largelm has no place for: {unused[:6]}")
    return {k: v.contiguous() for k, v in out.items()}

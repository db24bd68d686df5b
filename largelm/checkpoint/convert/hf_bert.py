"""largelm BERT <-> Hugging Face: not available yet.

The conversions here handle largelm's GPT models (megatron ``GPTModel`` and its pipeline form). largelm's BERT
(``model.arch: bert``, megatron-core's ``BertModel`` in largelm/model/bert.py) is the subject of the separate BERT
issue and was still being written when this converter was; its checkpoints are refused with ``MESSAGE``.

Note for that work: megatron's BERT is *pre-LN* (a LayerNorm before attention and before the MLP, plus a final
LayerNorm), while ``BertForMaskedLM`` is post-LN (LayerNorm after each residual add, and after the embeddings), so
``BertForMaskedLM`` cannot represent it exactly. The matching transformers class is ``MegatronBertForMaskedLM``
(``model_type: megatron-bert``: ``bert.encoder.layer.{i}.attention.ln``, ``.ln``, ``bert.encoder.ln``; fused QKV
split into ``query/key/value``, ``cls.predictions.transform`` = largelm's ``lm_head``, ``cls.predictions.bias`` =
``output_layer.bias``, ``bert.pooler`` and ``cls.seq_relationship`` = the binary head).
"""

from __future__ import annotations

MESSAGE = ("BERT checkpoints (model.arch='bert') are not converted yet: the converter handles largelm's GPT models; "
           "BERT conversion depends on the BERT issue (largelm/model/bert.py). Its Hugging Face target will be "
           "MegatronBertForMaskedLM: largelm's BERT is pre-LN, which BertForMaskedLM (post-LN) cannot represent")


def check_exportable(model) -> None:
    raise NotImplementedError(MESSAGE)


def to_hf(model, tensors):
    raise NotImplementedError(MESSAGE)


def model_fields(cfg) -> dict:
    raise NotImplementedError(MESSAGE)


def from_hf(model, tensors):
    raise NotImplementedError(MESSAGE)

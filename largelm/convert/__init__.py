"""Checkpoint conversion, a tool layer above training: reshard training checkpoints into other layouts, export to
and import from Hugging Face ``transformers`` - all through one consolidated format
(``largelm.checkpoint.consolidated``, read from DeepSpeed checkpoints by ``largelm.checkpoint.reader``), each
conversion verified by comparing logits (verify.py). Command line: ``largelm-convert`` (cli.py,
tools/convert_checkpoint.py).

Modules: reshard (consolidated -> training checkpoint of any layout), hf / hf_tokenizer (Hugging Face; the tensor
mappings are the architectures' adapters in ``largelm.model.hf``, found through ``largelm.model.registry``), verify
(logit checks), source (open any input), spawn (local ranks), api (the commands). Names, shapes and TP/PP rules:
``largelm.model.layout``.
"""

from largelm.errors import ConversionError, UnsupportedArchitecture, VerificationError

__all__ = ["ConversionError", "UnsupportedArchitecture", "VerificationError"]

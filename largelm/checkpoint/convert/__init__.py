"""Checkpoint conversion: consolidate ZeRO/TP/PP training checkpoints, reshard them into other layouts, export to
and import from Hugging Face ``transformers`` - all through one consolidated format (hub.py), each conversion
verified by comparing logits (verify.py). Command line: ``largelm-convert`` (cli.py, tools/convert_checkpoint.py).

Modules: layout (names, shapes, TP/PP rules), hub (consolidated format), consolidate (DeepSpeed checkpoints ->
hub), reshard (hub -> training checkpoint of any layout), hf / hf_gpt2 / hf_llama / hf_bert / hf_tokenizer
(Hugging Face), verify (logit checks), source (open any input), spawn (local ranks), api (the commands).
"""

from largelm.checkpoint.convert.errors import ConversionError, UnsupportedArchitecture, VerificationError

__all__ = ["ConversionError", "UnsupportedArchitecture", "VerificationError"]

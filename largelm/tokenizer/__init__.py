"""The sentencepiece ``Tokenizer`` wrapper used at run time (training one: ``largelm.prepare.tokenizer``)."""

from largelm.tokenizer.model import BERT_SPECIAL_PIECES, Tokenizer, TokenizerError

__all__ = ["BERT_SPECIAL_PIECES", "Tokenizer", "TokenizerError"]

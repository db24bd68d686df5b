"""Sentencepiece tokenizer: training (``train_tokenizer``) and the ``Tokenizer`` wrapper used everywhere else."""

from largelm.tokenizer.model import Tokenizer, TokenizerError

__all__ = ["Tokenizer", "TokenizerError", "train_tokenizer", "DEFAULT_SPECIAL_TOKENS"]


def __getattr__(name: str):
    # Lazy, so ``python -m largelm.tokenizer.train`` does not import its own module twice.
    if name in ("train_tokenizer", "DEFAULT_SPECIAL_TOKENS"):
        from largelm.tokenizer import train

        return getattr(train, name)
    raise AttributeError(f"module 'largelm.tokenizer' has no attribute {name!r}")

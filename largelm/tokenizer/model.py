"""``Tokenizer``: a thin wrapper around a sentencepiece model file that names its special ids."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from largelm.fileio import sha256_file

BERT_SPECIAL_PIECES = ("[CLS]", "[SEP]", "[MASK]")  # the pieces a BERT tokenizer must hold as single ids
MODEL_FILE_NAME = "spm.model"  # the model file's name when train_tokenizer is given a directory


class TokenizerError(ValueError):
    """A tokenizer file is missing or unusable, or a requested piece is not in its vocabulary."""


class Tokenizer:
    def __init__(self, processor: spm.SentencePieceProcessor, path: Path, sha256: str):
        self._sp = processor
        self.path = path
        self.sha256 = sha256  # identity of the model file; recorded in shard manifests and checked on load

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():  # e.g. the directory ``train_tokenizer --out DIR`` wrote its model into
            inside = path / MODEL_FILE_NAME
            hint = f" (did you mean {inside}?)" if inside.is_file() else ""
            raise TokenizerError(f"tokenizer model {path} is a directory, not a sentencepiece model file{hint}")
        if not path.is_file():
            raise TokenizerError(f"tokenizer model {path} does not exist")
        data = path.read_bytes()
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{path} is not a sentencepiece model: {err}") from None
        return cls(processor, path, sha256_file(path))

    # --- ids ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _special(self, name: str, value: int) -> int:
        if value < 0:
            raise TokenizerError(f"tokenizer {self.path} has no {name} token (it was trained with {name}_id=-1)")
        return value

    @property
    def pad_id(self) -> int:
        return self._special("pad", self._sp.pad_id())

    @property
    def bos_id(self) -> int:
        return self._special("bos", self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return self._special("eos", self._sp.eos_id())

    @property
    def unk_id(self) -> int:
        return self._special("unk", self._sp.unk_id())

    def token_id(self, piece: str) -> int:
        """Id of an exact vocabulary piece such as ``"[MASK]"``; an error when the piece is absent."""
        ident = self._sp.piece_to_id(piece)
        if self._sp.id_to_piece(ident) != piece:  # sentencepiece maps unknown pieces to unk silently
            raise TokenizerError(
                f"piece {piece!r} is not in the vocabulary of {self.path} (train the tokenizer with it in "
                "--special-tokens / user_defined_symbols)"
            )
        return ident

    def id_to_piece(self, ident: int) -> str:
        return self._sp.id_to_piece(ident)

    # --- text -----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"

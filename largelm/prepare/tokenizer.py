"""Train a sentencepiece tokenizer (BPE or unigram) on text/jsonl documents.

Fixed layout of the special ids, relied on by the data and model code::

    0 <pad>   1 <unk>   2 <s> (bos)   3 </s> (eos)   then user-defined pieces: [CLS] [SEP] [MASK] ... "\\n"

The BERT pieces are reserved by default so a BERT run can use the same tokenizer. A newline piece is always
added: sentencepiece trains on lines and would otherwise map "\\n" to <unk> (or to a byte piece with
byte_fallback), losing line structure of verse and plays.

Text is kept exactly (``identity`` normalisation, whitespace not collapsed), so ``decode(encode(t)) == t``
whenever every character is covered (always, with byte_fallback). Training is deterministic: the sampler is
seeded and the thread count is fixed (it is stored in the model file, so it is part of the model's identity).
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import sentencepiece as spm

from largelm.data.format import DataError
from largelm.prepare.documents import iter_documents
from largelm.tokenizer.model import MODEL_FILE_NAME, Tokenizer, TokenizerError

log = logging.getLogger(__name__)

DEFAULT_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]")
NEWLINE_PIECE = "\n"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# sentencepiece drops training lines longer than max_sentence_length bytes; we cut longer lines instead.
MAX_LINE_CHARS = 4096
MAX_LINE_BYTES = 4 * MAX_LINE_CHARS


def training_lines(documents: Iterable) -> Iterator[str]:
    """Non-blank lines of every document, long lines cut into pieces sentencepiece will accept."""
    for doc in documents:
        for line in doc.text.split("\n"):
            if not line.strip():
                continue
            for start in range(0, len(line), MAX_LINE_CHARS):
                yield line[start : start + MAX_LINE_CHARS]


def _min_vocab(special_tokens: Sequence[str], byte_fallback: bool) -> int:
    return 4 + len(special_tokens) + (256 if byte_fallback else 0)


def train_tokenizer(
    inputs: Sequence[str | Path],
    model_path: str | Path,
    *,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    text_field: str = "text",
    max_sentences: int = 0,
    num_threads: int = 1,
    seed: int = 0,
) -> Tokenizer:
    """Train on ``inputs`` (.txt/.jsonl) and write the model to ``model_path``.

    ``model_path`` ending in ``.model`` is the file itself; anything else is a directory that gets ``spm.model``.
    """
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if not 0 < character_coverage <= 1:
        raise TokenizerError(f"character_coverage must be in (0, 1], got {character_coverage}")
    specials = list(dict.fromkeys([*special_tokens, NEWLINE_PIECE]))  # ordered, no duplicates
    for reserved in ("<pad>", "<unk>", "<s>", "</s>"):
        if reserved in specials:
            raise TokenizerError(f"special token {reserved!r} is already built in (ids 0-3); do not list it")
    if vocab_size <= _min_vocab(specials, byte_fallback):
        raise TokenizerError(
            f"vocab_size={vocab_size} leaves no room for learned pieces: 4 built-in ids + {len(specials)} "
            f"user-defined pieces{' + 256 byte pieces' if byte_fallback else ''} already take "
            f"{_min_vocab(specials, byte_fallback)}"
        )
    model_path = Path(model_path)
    if model_path.suffix != ".model":
        model_path = model_path / MODEL_FILE_NAME
    lines = training_lines(iter_documents(inputs, text_field))
    first = next(lines, None)
    if first is None:
        raise DataError(f"no text found in {[str(p) for p in inputs]}")

    reader_errors: list[Exception] = []

    def all_lines() -> Iterator[str]:
        # sentencepiece turns an exception raised in here into a generic RuntimeError; keep the original.
        try:
            yield first
            yield from lines
        except Exception as err:
            reader_errors.append(err)
            raise

    spm.set_random_generator_seed(seed)  # used by sentence sampling (max_sentences) and unigram seeding
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_lines(),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            user_defined_symbols=specials,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=MAX_LINE_BYTES,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=max_sentences > 0,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:  # e.g. "Vocabulary size is too high" for a small corpus
        if reader_errors:
            raise reader_errors[0] from None
        raise TokenizerError(f"sentencepiece training on {[str(p) for p in inputs]} failed: {err}") from None
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_name(model_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(model_path)
    tokenizer = Tokenizer.load(model_path)
    log.info("wrote %s (vocab %d, sha256 %s)", model_path, tokenizer.vocab_size, tokenizer.sha256)
    return tokenizer


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Train a sentencepiece tokenizer on .txt/.jsonl files.")
    parser.add_argument("--input", nargs="+", required=True, help=".txt (one document per file) or .jsonl files")
    parser.add_argument("--out", required=True,
                        help=f"output model file (*.model) or a directory that gets {MODEL_FILE_NAME}")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                        help="map uncovered characters to <unk> instead of UTF-8 byte pieces")
    parser.add_argument("--special-tokens", nargs="*", default=list(DEFAULT_SPECIAL_TOKENS),
                        help="user-defined pieces (default: [CLS] [SEP] [MASK])")
    parser.add_argument("--text-field", default="text", help="jsonl field holding the text")
    parser.add_argument("--max-sentences", type=int, default=0, help="sample this many lines (0 = all)")
    parser.add_argument("--threads", type=int, default=1, help="trainer threads (stored in the model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        tok = train_tokenizer(
            args.input, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
            character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
            special_tokens=args.special_tokens, text_field=args.text_field,
            max_sentences=args.max_sentences, num_threads=args.threads, seed=args.seed,
        )
    except (DataError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{tok.path} vocab_size={tok.vocab_size} sha256={tok.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

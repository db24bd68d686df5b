"""largelm's sentencepiece model -> a Hugging Face fast tokenizer (``tokenizer.json``) that
``AutoTokenizer.from_pretrained(dir)`` loads offline and that encodes text to the same ids.

largelm's tokenizers (largelm/prepare/tokenizer.py) are sentencepiece BPE with identity normalisation, a dummy
``▁`` prefix, spaces kept as ``▁`` (no whitespace collapsing), byte fallback, digits split, control pieces
``<pad> <unk> <s> </s>`` and user-defined pieces (``[CLS] [SEP] [MASK]``, ``\\n``). The equivalent
``tokenizers`` pipeline:

* model: BPE over the same vocabulary (same ids) with merges ordered by sentencepiece's piece scores
  (``transformers``' ``SentencePieceExtractor``), ``byte_fallback``, ``<unk>``;
* normaliser: ``Prepend("▁")`` then ``Replace(" ", "▁")`` (sentencepiece's dummy prefix and whitespace
  escaping: unlike the ``Metaspace`` pre-tokenizer it also prefixes text that starts with a space);
* decoder: ``▁`` -> space, byte fallback, fuse, strip the one leading space;
* ``\\n`` stays an ordinary vocabulary piece; ``[CLS] [SEP] [MASK]`` are added tokens and the control pieces
  special tokens.

Exact for any text that does not contain the literal strings of those added/special tokens (which
``tokenizers`` matches before normalising, so their neighbours' ``▁`` prefixes differ from sentencepiece's).
``export_tokenizer`` checks the equality on a built-in set of texts (whitespace, newlines, digits, unicode,
bytes) and fails on any difference. The sentencepiece file itself is copied as ``tokenizer.model``.
No BOS/EOS is added on encode: largelm's data pipeline does not add BOS and appends EOS per document itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from largelm.errors import ConversionError
from largelm.tokenizer import BERT_SPECIAL_PIECES

CHECK_TEXTS = (
    "Hello world",
    "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer",
    "  two leading spaces, trailing space ",
    " ",
    "",
    "\nstarts with a newline\n\nand ends with two\n\n",
    "tabs\tand   runs   of    spaces",
    "digits 1234567890 and 3.14159",
    "ünïcödé, 中文, emoji 😀, ☃ and a rare glyph \U0001d11e",
    "MiXeD CaSe and punctuation!?;:'\"()[]{}<>",
)

CONTROL, USER_DEFINED = 3, 4  # sentencepiece ModelProto.SentencePiece.Type


def _proto(model_path: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    return proto


def build_fast_tokenizer(model_path: Path, bert: bool = False):
    """A ``PreTrainedTokenizerFast`` equivalent to the sentencepiece model at ``model_path``. ``bert``: name
    ``[CLS] [SEP] [MASK]`` as its cls/sep/mask tokens and add ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` (token
    types 0 and 1) on encode with special tokens, the layout largelm's BERT data uses."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

    proto = _proto(model_path)
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        raise ConversionError(f"{model_path}: only sentencepiece BPE models are converted (largelm trains BPE)")
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces or not norm.add_dummy_prefix:
        raise ConversionError(f"{model_path}: normaliser {norm.name!r} (remove_extra_whitespaces="
                              f"{norm.remove_extra_whitespaces}, add_dummy_prefix={norm.add_dummy_prefix}) is not "
                              "the identity/dummy-prefix setting largelm trains with; no exact tokenizer.json exists")
    vocab, _, merges = SentencePieceExtractor(str(model_path)).extract()
    spec = proto.trainer_spec
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=spec.unk_piece, fuse_unk=True,
                               byte_fallback=spec.byte_fallback))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    pieces = list(proto.pieces)
    specials = [p.piece for i, p in enumerate(pieces) if p.type == CONTROL or i == spec.unk_id]
    added = [p.piece for p in pieces if p.type == USER_DEFINED and p.piece != "\n"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in added])

    def piece(i: int):
        return pieces[i].piece if 0 <= i < len(pieces) else None

    extra = {}
    if bert:
        ids = {p.piece: i for i, p in enumerate(pieces)}
        missing = [p for p in BERT_SPECIAL_PIECES if p not in ids]
        if missing:
            raise ConversionError(f"{model_path} lacks the BERT pieces {missing}")
        cls, sep, mask = BERT_SPECIAL_PIECES
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, ids[cls]), (sep, ids[sep])])
        extra = {"cls_token": cls, "sep_token": sep, "mask_token": mask}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=piece(spec.unk_id), bos_token=piece(spec.bos_id),
        eos_token=piece(spec.eos_id), pad_token=piece(spec.pad_id), clean_up_tokenization_spaces=False, **extra,
    )


def special_ids(model_path: Path) -> dict:
    spec = _proto(model_path).trainer_spec
    ids = {"bos_token_id": spec.bos_id, "eos_token_id": spec.eos_id, "pad_token_id": spec.pad_id}
    return {k: (v if v >= 0 else None) for k, v in ids.items()}


def export_tokenizer(model_path: Path, out_dir: Path, extra_texts: tuple = (), bert: bool = False) -> dict:
    """Write tokenizer.json / tokenizer_config.json / tokenizer.model to ``out_dir`` and check that
    ``AutoTokenizer.from_pretrained(out_dir)`` encodes like sentencepiece (``bert``: and frames pairs as
    ``[CLS] A [SEP] B [SEP]``). Returns the check record."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    model_path, out_dir = Path(model_path), Path(out_dir)
    fast = build_fast_tokenizer(model_path, bert=bert)
    fast.save_pretrained(str(out_dir))
    shutil.copyfile(model_path, out_dir / "tokenizer.model")
    loaded = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_path.read_bytes())
    texts = list(CHECK_TEXTS) + list(extra_texts)
    mismatches = []
    for text in texts:
        ours = sp.encode(text, out_type=int)
        theirs = loaded.encode(text, add_special_tokens=False)
        if ours != theirs:
            mismatches.append({"text": text[:80], "sentencepiece": ours[:20], "hf": theirs[:20]})
        elif loaded.decode(theirs) != sp.decode(ours):
            mismatches.append({"text": text[:80], "decode": [sp.decode(ours)[:80], loaded.decode(theirs)[:80]]})
    if bert:
        a, b = sp.encode(texts[0], out_type=int), sp.encode(texts[1], out_type=int)
        cls, sep = loaded.cls_token_id, loaded.sep_token_id
        pair = loaded(texts[0], texts[1])
        want = [cls, *a, sep, *b, sep]
        types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        if pair["input_ids"] != want or pair.get("token_type_ids", types) != types:
            mismatches.append({"pair": [texts[0], texts[1]], "expected": want, "hf": pair["input_ids"]})
    if mismatches:
        raise ConversionError(f"the exported tokenizer does not reproduce {model_path}: {mismatches[:3]}")
    return {"texts_checked": len(texts), "tokenizer_class": type(loaded).__name__, "vocab_size": sp.get_piece_size()}

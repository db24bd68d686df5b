"""Sentence-pair shards for BERT pretraining (manifest ``kind: bert_pairs``; layout in ``largelm.data.format``).

Per document (the construction of Google's BERT ``create_instances_from_document`` and Megatron's BERT dataset):
the text is split into sentences (paragraphs at blank lines, sentences after ``.!?``), each sentence tokenized;
consecutive sentences are collected until they reach the target length (``seq_length - 3``; with
``short_seq_prob`` a random shorter target), that chunk is cut at a random sentence boundary into segment A and
segment B (a one-sentence chunk is cut inside the sentence), and the pair is truncated to fit (tokens removed
from the longer segment, from its front or back at random). Pair objective:

* ``sop`` (sentence-order prediction, ALBERT): with p=0.5 A and B are swapped, label 1;
* ``nsp`` (next-sentence prediction, BERT): with p=0.5 B is replaced by a stretch of a random other document of the
  same split, label 1 (the chunk's unused sentences are put back, as in Google's code).

Every random choice for document ``d`` comes from a generator seeded by ``(seed, split, d)``: the shards are a
pure function of (inputs, tokenizer, seq_length, objective, seed). [CLS]/[SEP]/[MASK] occurring literally in the
text are dropped (sentencepiece encodes them as the special ids), so the two [SEP]s always mark the segments.
Masking is not done here but at load time (``largelm.data.bert_masking``: new masks every epoch).
The train/valid document split is ``largelm.prepare.gpt_data``'s (lowest text hashes go to valid).

Text that is not written is counted, per split, in the manifest (as the GPT preparation does): ``empty_documents``
are blank documents and documents with nothing but [CLS]/[SEP]/[MASK] in them; ``dropped_tokens`` are the literal
special tokens (with sentences holding nothing else), the tokens cut by the truncation of over-long pairs, and
one-token leftovers that cannot be split into A and B. An NSP random B is another document's text: its truncation
drops nothing (that text is written with its own document).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from largelm.data.format import DataError, Manifest
from largelm.data.shards import seed_words
from largelm.prepare.documents import check_input_files, iter_documents
from largelm.prepare.gpt_data import (
    SplitWriter,
    _clear_split_dir,
    document_bucket,
    prepare_arguments,
    run_prepare,
    valid_cutoff,
)
from largelm.tokenizer import BERT_SPECIAL_PIECES, Tokenizer

log = logging.getLogger(__name__)

SEED_PAIRS = 4
OBJECTIVES = ("sop", "nsp")
_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Paragraphs (blank lines) split after sentence-final punctuation; empty pieces dropped."""
    out = []
    for para in _PARAGRAPH.split(text):
        out.extend(s for s in _SENTENCE_END.split(para.strip()) if s.strip())
    return out


def _truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: np.random.Generator) -> tuple[int, int]:
    """Cut the longer segment (front or back at random) until the pair fits; returns the tokens cut from a and b."""
    cut = [0, 0]
    while len(a) + len(b) > max_tokens:
        side = 0 if len(a) > len(b) else 1
        longer = (a, b)[side]
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
        cut[side] += 1
    return cut[0], cut[1]


def document_pairs(
    doc: list[list[int]], doc_index: int, docs: Sequence[list[list[int]]], *, seq_length: int, objective: str,
    rng: np.random.Generator, short_seq_prob: float = 0.1, dropped: Optional[dict[str, int]] = None,
) -> list[tuple[list[int], list[int], int]]:
    """(A, B, label) pairs from one document's tokenized sentences (``docs``: the split, for NSP's random B).

    ``dropped``, if given, gets this document's tokens that no pair holds added to its ``truncated`` (cut from
    over-long pairs) and ``unpaired`` (a one-token chunk, which cannot be split into A and B) entries.
    """
    dropped = {"truncated": 0, "unpaired": 0} if dropped is None else dropped
    max_tokens = seq_length - 3  # [CLS] A [SEP] B [SEP]
    target = max_tokens
    if rng.random() < short_seq_prob:
        target = int(rng.integers(2, max_tokens + 1))
    pairs, chunk, length, i = [], [], 0, 0
    while i < len(doc):
        chunk.append(doc[i])
        length += len(doc[i])
        if i == len(doc) - 1 or length >= target:
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
            a = [t for s in chunk[:a_end] for t in s]
            b = [t for s in chunk[a_end:] for t in s]
            label, foreign_b = 0, False
            if objective == "nsp" and len(docs) > 1 and rng.random() < 0.5:
                other = int(rng.integers(0, len(docs) - 1))
                other += other >= doc_index  # any document but this one
                start = int(rng.integers(0, len(docs[other])))
                b = []
                for sent in docs[other][start:]:
                    b.extend(sent)
                    if len(a) + len(b) >= target:
                        break
                i -= len(chunk) - a_end  # the chunk's B sentences were not used: start the next chunk with them
                label, foreign_b = 1, True
            else:
                if not b and len(a) >= 2:  # one long sentence: cut it inside
                    cut = int(rng.integers(1, len(a)))
                    a, b = a[:cut], a[cut:]
                if objective == "sop" and rng.random() < 0.5:
                    a, b, label = b, a, 1
            cut_a, cut_b = _truncate_pair(a, b, max_tokens, rng)
            dropped["truncated"] += cut_a + (0 if foreign_b else cut_b)  # a random B's text is written elsewhere
            if a and b:
                pairs.append((a, b, label))
            else:
                dropped["unpaired"] += len(a) + len(b)
            chunk, length = [], 0
        i += 1
    return pairs


def pair_sample(a: list[int], b: list[int], label: int, seq_length: int, cls_id: int, sep_id: int,
                pad_id: int) -> np.ndarray:
    ids = [cls_id, *a, sep_id, *b, sep_id]
    return np.asarray(ids + [pad_id] * (seq_length - len(ids)) + [label], dtype=np.int64)


def prepare_bert_data(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: str | Path | Tokenizer,
    seq_length: int,
    *,
    objective: str = "sop",
    seed: int = 1234,
    short_seq_prob: float = 0.1,
    samples_per_shard: int = 1000,
    valid_fraction: float = 0.01,
    text_field: str = "text",
    overwrite: bool = False,
) -> dict[str, Manifest]:
    """Write ``<out_dir>/train`` (and ``valid``) of ``bert_pairs`` samples; return the manifests."""
    if objective not in OBJECTIVES:
        raise DataError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if seq_length < 8 or samples_per_shard <= 0:
        raise DataError(f"seq_length ({seq_length}) must be >= 8 and samples_per_shard ({samples_per_shard}) positive")
    if not 0 <= valid_fraction < 1 or not 0 <= short_seq_prob <= 1:
        raise DataError(f"valid_fraction ({valid_fraction}) must be in [0, 1), short_seq_prob ({short_seq_prob}) in "
                        "[0, 1]")
    files = check_input_files(inputs)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)

    try:
        cls_id, sep_id, mask_id = (tok.token_id(p) for p in BERT_SPECIAL_PIECES)
    except ValueError as err:
        raise DataError(f"tokenizer {tok.path} cannot be used for BERT: {err}") from None
    drop = {cls_id, sep_id, mask_id, tok.pad_id}
    special_text = re.compile("|".join(re.escape(p) for p in BERT_SPECIAL_PIECES))
    out_dir = Path(out_dir)
    splits = ["train"] + (["valid"] if valid_fraction > 0 else [])
    for split in splits:
        _clear_split_dir(out_dir / split, split, overwrite)

    documents = list(iter_documents(files, text_field))
    cutoff = valid_cutoff([document_bucket(d.text) for d in documents if d.text.strip()], valid_fraction)
    docs: dict[str, list[list[list[int]]]] = {split: [] for split in splits}
    # Text not written, per split (manifest empty_documents / dropped_tokens), rather than dropped silently.
    empty = {split: 0 for split in splits}
    dropped = {split: {"special": 0, "truncated": 0, "unpaired": 0} for split in splits}
    for doc in documents:
        split = "valid" if cutoff is not None and document_bucket(doc.text) <= cutoff else "train"
        if not doc.text.strip():
            empty[split] += 1
            log.warning("%s: empty document, not written", doc.source)
            continue
        sentences = []
        texts = split_sentences(doc.text)
        for text, ids in zip(texts, tok.encode_batch(texts)):
            # A sentence of nothing but [CLS]/[SEP]/[MASK] would leave only their whitespace pieces: drop it whole.
            kept = [t for t in ids if t not in drop] if special_text.sub("", text).strip() else []
            dropped[split]["special"] += len(ids) - len(kept)
            if kept:
                sentences.append(kept)
        if sentences:
            docs[split].append(sentences)
        else:
            empty[split] += 1
            log.warning("%s: no text but [CLS]/[SEP]/[MASK], not written", doc.source)

    manifests = {}
    for s_index, split in enumerate(splits):
        writer = SplitWriter(out_dir / split, split, seq_length, tok.vocab_size, samples_per_shard,
                             manifest_extra={"kind": "bert_pairs", "pair_objective": objective})
        labels = [0, 0]
        for d, doc in enumerate(docs[split]):
            writer.num_documents += 1
            rng = np.random.default_rng(seed_words(seed, SEED_PAIRS, s_index, d))
            for a, b, label in document_pairs(doc, d, docs[split], seq_length=seq_length, objective=objective,
                                              rng=rng, short_seq_prob=short_seq_prob, dropped=dropped[split]):
                writer.add_sample(pair_sample(a, b, label, seq_length, cls_id, sep_id, tok.pad_id))
                labels[label] += 1
        manifest = writer.finish(eos_id=sep_id, tokenizer_sha256=tok.sha256, empty_documents=empty[split],
                                 dropped_tokens=sum(dropped[split].values()), inputs=[str(f) for f in files])
        manifests[split] = manifest
        log.info("%s: %d documents -> %d %s pairs (%d in order, %d %s) in %d shards; %d empty documents, %d tokens "
                 "dropped (%d literal [CLS]/[SEP]/[MASK], %d cut from over-long pairs, %d one-token leftovers)",
                 split, manifest.num_documents, manifest.num_samples, objective, labels[0], labels[1],
                 "swapped" if objective == "sop" else "random", len(manifest.shards), manifest.empty_documents,
                 manifest.dropped_tokens, dropped[split]["special"], dropped[split]["truncated"],
                 dropped[split]["unpaired"])
    return manifests


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = prepare_arguments("Tokenize .txt/.jsonl documents into BERT sentence-pair shards.",
                               tokenizer_help="sentencepiece .model file with [CLS] [SEP] [MASK]",
                               seq_length_help="model sequence length ([CLS] A [SEP] B [SEP])")
    parser.add_argument("--objective", choices=OBJECTIVES, default="sop", help="pair label: sentence order or NSP")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--short-seq-prob", type=float, default=0.1)
    args = parser.parse_args(None if argv is None else list(argv))
    return run_prepare(args, prepare_bert_data, lambda m: f"{m.num_samples} pairs, {len(m.shards)} shards, "
                                                          f"{m.empty_documents} empty documents, "
                                                          f"{m.dropped_tokens} dropped tokens",
                       objective=args.objective, seed=args.seed, short_seq_prob=args.short_seq_prob)


if __name__ == "__main__":
    sys.exit(main())

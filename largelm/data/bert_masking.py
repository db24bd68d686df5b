"""BERT's dynamic masking: a deterministic per-sample transform run in the loader workers.

A ``bert_pairs`` sample (``largelm.data.format``) is ``[CLS] A [SEP] B [SEP] <pad>...`` plus the pair label.
``BertMasker(sample)`` returns it with the model inputs added (numpy int64, collated by the loader into tensors):

* ``input_ids`` [s]: the ids after masking;
* ``token_type_ids`` [s]: 0 for ``[CLS] A [SEP]``, 1 for ``B [SEP]``, 0 on padding;
* ``attention_mask`` [s]: 1 on real tokens, 0 on padding (pad id 0);
* ``mlm_labels`` [s]: the original id at masked positions, ``IGNORE_INDEX`` (-100) everywhere else;
* ``pair_label`` []: 0 = B follows A (in order / true next segment), 1 = swapped (SOP) or random (NSP).

Masking (BERT / Megatron): candidates are all real tokens except the special ones ([CLS], [SEP], [MASK], pad,
unk, bos, eos are never masked). ``round(mask_prob * candidates)`` (at least 1) of them are chosen; each chosen
position becomes [MASK] with ``mask_token_prob``, a random ordinary token with ``random_token_prob`` and stays as
it is otherwise (80/10/10 by default); all chosen positions get labels. With ``whole_word_masking`` the unit of
choice is a word: a sentencepiece piece starting with "▁" (or following a newline / special token) starts a
word, and every following piece without "▁" belongs to it (so punctuation joins the word before it, as in
ALBERT's n-gram-free whole-word masking); a word that would overshoot the budget is skipped, as in Google's BERT.

Determinism: the random draws for a sample depend only on ``(seed, dataset index, epoch, sample key)``, so the
masks are new every epoch (dynamic masking), identical on a resumed run, and independent of worker count and
batching.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

from largelm.data.shards import seed_words
from largelm.tokenizer import BERT_SPECIAL_PIECES

IGNORE_INDEX = -100
SEED_MASK = 3  # purpose word, distinct from largelm.data.shards' SEED_SHARD_ORDER/BLEND/SHUFFLE
WORD_START = "\u2581"  # sentencepiece's whitespace marker


def _key_number(key: str) -> int:
    if key.startswith("s") and key[1:].isdigit():
        return int(key[1:])
    return zlib.crc32(key.encode("utf-8")) + 2**40  # not a largelm key: still deterministic, off the index range


class BertMasker:
    """Picklable per-sample transform (only numpy tables and numbers); see the module docstring."""

    def __init__(
        self,
        *,
        seq_length: int,
        vocab_size: int,
        cls_id: int,
        sep_id: int,
        mask_id: int,
        special_ids: list[int],
        word_start: np.ndarray,
        seed: int = 0,
        mask_prob: float = 0.15,
        mask_token_prob: float = 0.8,
        random_token_prob: float = 0.1,
        whole_word_masking: bool = False,
        pad_id: int = 0,
        newline_ids: tuple = (),
    ):
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        if mask_token_prob < 0 or random_token_prob < 0 or mask_token_prob + random_token_prob > 1:
            raise ValueError(f"mask_token_prob ({mask_token_prob}) + random_token_prob ({random_token_prob}) must "
                             "be within [0, 1]")
        self.seq_length, self.seed = seq_length, seed
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = cls_id, sep_id, mask_id, pad_id
        self.mask_prob, self.mask_token_prob, self.random_token_prob = mask_prob, mask_token_prob, random_token_prob
        self.whole_word_masking = whole_word_masking
        self.special = np.zeros(vocab_size, dtype=bool)
        self.special[list(special_ids)] = True
        # A word starts at a "▁" piece, a special token, or right after a newline/special token.
        self.word_start = np.asarray(word_start, dtype=bool) | self.special
        self.random_ids = np.flatnonzero(~self.special).astype(np.int64)
        # The piece after a special token or a newline starts a new word even without "▁".
        self.breaks_word = self.special.copy()
        self.breaks_word[list(newline_ids)] = True

    @classmethod
    def from_tokenizer(cls, tokenizer, seq_length: int, *, seed: int = 0, **options) -> "BertMasker":
        """Special ids and word starts from a ``largelm.tokenizer.Tokenizer`` (raises TokenizerError, naming the
        tokenizer file, when it lacks [CLS]/[SEP]/[MASK])."""
        cls_id, sep_id, mask_id = (tokenizer.token_id(p) for p in BERT_SPECIAL_PIECES)
        vocab = tokenizer.vocab_size
        special = {cls_id, sep_id, mask_id, tokenizer.pad_id}
        for name in ("unk_id", "bos_id", "eos_id"):
            try:
                special.add(getattr(tokenizer, name))
            except ValueError:  # TokenizerError: the tokenizer was trained without it
                pass
        pieces = [tokenizer.id_to_piece(i) for i in range(vocab)]
        word_start = np.array([p.startswith(WORD_START) or p == "\n" for p in pieces], dtype=bool)
        return cls(seq_length=seq_length, vocab_size=vocab, cls_id=cls_id, sep_id=sep_id, mask_id=mask_id,
                   special_ids=sorted(special), word_start=word_start, seed=seed, pad_id=tokenizer.pad_id,
                   newline_ids=tuple(i for i, p in enumerate(pieces) if p == "\n"), **options)

    def identity(self) -> dict:
        """The settings that decide the masks, JSON-serialisable: the loader records them in its resume state and
        refuses a resume whose masker differs (``largelm.data.loader.TokenLoader.load_state_dict``).

        ``token_tables`` is a digest of the tokenizer-derived tables (special ids, word starts, word breaks), so a
        masker built from another tokenizer differs too. The pair objective (SOP/NSP) is not a masking setting: it
        is written into the shards, so it is covered by the datasets' fingerprints."""
        tables = hashlib.sha256()
        for table in (self.special, self.word_start, self.breaks_word):
            tables.update(np.packbits(table).tobytes())
        return {
            "transform": "bert_masking", "seed": int(self.seed), "mask_prob": float(self.mask_prob),
            "mask_token_prob": float(self.mask_token_prob), "random_token_prob": float(self.random_token_prob),
            "whole_word_masking": bool(self.whole_word_masking), "seq_length": int(self.seq_length),
            "vocab_size": int(len(self.special)), "cls_id": int(self.cls_id), "sep_id": int(self.sep_id),
            "mask_id": int(self.mask_id), "pad_id": int(self.pad_id), "token_tables": tables.hexdigest(),
        }

    # --- the transform ------------------------------------------------------------------------------------
    def units(self, ids: np.ndarray) -> list[np.ndarray]:
        """Maskable units of a sample: single candidate positions, or whole words."""
        cand = ~self.special[ids]
        positions = np.flatnonzero(cand)
        if not self.whole_word_masking or len(positions) == 0:
            return [positions[i : i + 1] for i in range(len(positions))]
        starts = self.word_start[ids].copy()
        starts[1:] |= self.breaks_word[ids[:-1]]
        breaks = [0]
        for k in range(1, len(positions)):
            if starts[positions[k]] or positions[k] != positions[k - 1] + 1:
                breaks.append(k)
        breaks.append(len(positions))
        return [positions[a:b] for a, b in zip(breaks[:-1], breaks[1:])]

    def __call__(self, sample: dict) -> dict:
        tokens = np.asarray(sample["tokens"], dtype=np.int64)
        s = self.seq_length
        if tokens.shape != (s + 1,):
            raise ValueError(f"sample {sample.get('key')!r}: expected {s + 1} ids, got {tokens.shape}")
        ids, pair_label = tokens[:s].copy(), tokens[s]
        seps = np.flatnonzero(ids == self.sep_id)
        if ids[0] != self.cls_id or len(seps) != 2:
            raise ValueError(f"sample {sample.get('key')!r} is not [CLS] A [SEP] B [SEP] (is this a bert_pairs "
                             f"dataset?)")
        attention_mask = (ids != self.pad_id).astype(np.int64)
        token_type_ids = np.zeros(s, dtype=np.int64)
        token_type_ids[seps[0] + 1 : seps[1] + 1] = 1

        rng = np.random.default_rng(seed_words(self.seed, SEED_MASK, sample.get("dataset", 0),
                                               sample.get("epoch", 0), _key_number(str(sample.get("key", "")))))
        units = self.units(ids)
        num_candidates = sum(len(u) for u in units)
        budget = max(1, int(round(num_candidates * self.mask_prob))) if num_candidates else 0
        chosen: list[int] = []
        for u in rng.permutation(len(units)):
            if len(chosen) >= budget:
                break
            if len(chosen) + len(units[u]) > budget:
                continue
            chosen.extend(units[u].tolist())
        chosen_arr = np.sort(np.asarray(chosen, dtype=np.int64))
        labels = np.full(s, IGNORE_INDEX, dtype=np.int64)
        labels[chosen_arr] = ids[chosen_arr]
        draw = rng.random(len(chosen_arr))
        to_mask = chosen_arr[draw < self.mask_token_prob]
        to_random = chosen_arr[(draw >= self.mask_token_prob) & (draw < self.mask_token_prob + self.random_token_prob)]
        ids[to_mask] = self.mask_id
        ids[to_random] = self.random_ids[rng.integers(0, len(self.random_ids), len(to_random))]
        return {**sample, "input_ids": ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
                "mlm_labels": labels, "pair_label": np.int64(pair_label)}

"""BERT data: sentence-pair shards and dynamic masking (statistics, labels, specials, whole words, determinism)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from largelm.data import DataError, build_loader, read_manifest
from largelm.data.bert_masking import IGNORE_INDEX, BertMasker
from largelm.prepare.bert_data import OBJECTIVES, document_pairs, prepare_bert_data, split_sentences
from largelm.prepare.tokenizer import train_tokenizer
from largelm.tokenizer import Tokenizer, TokenizerError

SEQ = 48


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer.load(tokenizer_path)


@pytest.fixture(scope="module")
def bert_dir(small_corpus, tokenizer_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("bert_shards")
    prepare_bert_data([small_corpus], out, tokenizer_path, SEQ, objective="sop", seed=5, samples_per_shard=64,
                      valid_fraction=0.2)
    return out


def masker(tok, **options):
    return BertMasker.from_tokenizer(tok, SEQ, seed=3, **options)


def samples(bert_dir, n=None):
    loader = build_loader([bert_dir / "train"], SEQ, batch_size=16, num_workers=0, shuffle_buffer=0, infinite=False,
                          kind="bert_pairs")
    out = []
    for batch in loader:
        for key, tokens in zip(batch["key"], batch["tokens"].numpy()):
            out.append({"key": key, "tokens": tokens, "epoch": 0, "dataset": 0})
    return out[:n]


# --- shards -----------------------------------------------------------------------------------------------------
def test_pair_shards_layout_and_sop_balance(bert_dir, tok):
    m = read_manifest(bert_dir / "train")
    assert m.kind == "bert_pairs" and m.pair_objective == "sop" and m.seq_length == SEQ
    cls_id, sep_id = tok.token_id("[CLS]"), tok.token_id("[SEP]")
    all_samples = samples(bert_dir)
    assert len(all_samples) == m.num_samples > 200
    labels = []
    for s in all_samples:
        ids, label = s["tokens"][:SEQ], s["tokens"][SEQ]
        assert ids[0] == cls_id and label in (0, 1)
        seps = np.flatnonzero(ids == sep_id)
        assert len(seps) == 2 and seps[0] > 1 and seps[1] > seps[0] + 1  # both segments non-empty
        assert (ids[seps[1] + 1 :] == 0).all() and (ids[: seps[1] + 1] != 0).all()  # padding only at the tail
        assert tok.token_id("[MASK]") not in ids
        labels.append(label)
    assert 0.4 < np.mean(labels) < 0.6


def test_sop_swaps_consecutive_segments_and_prepare_is_deterministic(bert_dir, small_corpus, tokenizer_path, tmp_path):
    doc = [[10, 11], [12, 13, 14], [15], [16, 17]]
    pairs = document_pairs(doc, 0, [doc], seq_length=64, objective="sop", rng=np.random.default_rng(0),
                           short_seq_prob=0)
    (a, b, label), = pairs
    joined = (b + a) if label else (a + b)
    assert joined == [10, 11, 12, 13, 14, 15, 16, 17]
    again = tmp_path / "again"
    prepare_bert_data([small_corpus], again, tokenizer_path, SEQ, objective="sop", seed=5, samples_per_shard=64,
                      valid_fraction=0.2)
    assert read_manifest(again / "train").fingerprint() != ""
    assert [s.sha256 for s in read_manifest(again / "train").shards] == \
        [s.sha256 for s in read_manifest(bert_dir / "train").shards]


def test_nsp_pairs_use_other_documents(tmp_path):
    docs = [[[d * 100 + k] * 3 for k in range(6)] for d in range(4)]
    labels, foreign = [], 0
    for d, doc in enumerate(docs):
        for a, b, label in document_pairs(doc, d, docs, seq_length=16, objective="nsp",
                                          rng=np.random.default_rng(d), short_seq_prob=0):
            labels.append(label)
            if label:
                assert all(t // 100 != d for t in b)
                foreign += 1
            else:
                assert all(t // 100 == d for t in a + b)
    assert 0 < foreign < len(labels)


def test_pairs_account_for_every_token_of_the_document():
    """Tokens of a document are either in its pairs or counted as dropped (truncated / unpaired); an NSP random B is
    another document's text, so cutting it drops nothing of this document."""
    g = np.random.default_rng(0)
    docs = [[list(range(int(n))) for n in g.integers(1, 25, size=int(g.integers(1, 8)))] + [[7]] for _ in range(12)]
    for objective in OBJECTIVES:
        totals = {"truncated": 0, "unpaired": 0}
        for d, doc in enumerate(docs):
            dropped = {"truncated": 0, "unpaired": 0}
            own = 0
            for a, b, label in document_pairs(doc, d, docs, seq_length=16, objective=objective,
                                              rng=np.random.default_rng(d), short_seq_prob=0.2, dropped=dropped):
                own += len(a) + (0 if objective == "nsp" and label else len(b))
            assert own + dropped["truncated"] + dropped["unpaired"] == sum(map(len, doc)), (objective, d)
            totals = {k: totals[k] + dropped[k] for k in totals}
        assert totals["truncated"] > 0 and totals["unpaired"] > 0, (objective, totals)


def test_dropped_text_is_counted_in_manifest_and_cli(tmp_path, tokenizer_path, tok, capsys):
    """A blank document and one of nothing but [CLS]/[SEP]/[MASK] are empty documents; the literal special tokens,
    the overshoot of an over-long pair and a one-token leftover are dropped tokens (like GPT's manifests)."""
    from largelm.prepare.bert_data import main

    seq = 16  # pairs hold seq - 3 = 13 tokens
    long_sentence = "Now is the winter of our discontent made glorious summer by this sun of York and all the clouds"
    n_long = len(tok.encode(long_sentence))
    assert n_long > 2 * (seq - 3) and len(tok.encode("a")) == 1
    specials_only = ["[CLS] [SEP]", "[MASK]"]  # two sentences (paragraphs) of special tokens and whitespace
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in [
        "  \n ",                                           # empty document
        "\n\n".join(specials_only),                        # no text but special tokens
        long_sentence + ". a",                              # an over-long pair, then a one-token sentence
        "To be, or not [MASK] to be. [SEP]",                # a literal special inside and a [SEP]-only sentence
    ]))
    argv = ["--input", str(corpus), "--tokenizer", str(tokenizer_path), "--out", str(tmp_path / "out"),
            "--seq-length", str(seq), "--valid-fraction", "0", "--short-seq-prob", "0", "--samples-per-shard", "8"]
    assert main(argv) == 0
    m = read_manifest(tmp_path / "out" / "train")
    special = sum(len(tok.encode(t)) for t in [*specials_only, "[SEP]"]) + 1  # + the [MASK] inside a sentence
    truncated = (n_long + 1) - (seq - 3)  # "<long sentence>." is one sentence, cut to 13 tokens
    assert (m.num_documents, m.num_samples, m.empty_documents) == (2, 2, 2)
    assert m.dropped_tokens == special + truncated + 1, (special, truncated)
    loader = build_loader([tmp_path / "out" / "train"], seq, batch_size=2, num_workers=0, shuffle_buffer=0,
                          infinite=False, kind="bert_pairs")
    ids = np.concatenate([batch["tokens"][:, :seq].numpy().ravel() for batch in loader])
    written = int((~np.isin(ids, [0, tok.token_id("[CLS]"), tok.token_id("[SEP]")])).sum())
    kept = (n_long + 1) + 1 + len(tok.encode("To be, or not [MASK] to be.")) - 1
    assert written + truncated + 1 == kept  # every kept token is in a pair or counted
    out = capsys.readouterr().out
    assert f"2 pairs, 1 shards, 2 empty documents, {m.dropped_tokens} dropped tokens" in out


def test_sentence_split():
    assert split_sentences("One. Two!  Three?\n\nFour\nfive.") == ["One.", "Two!", "Three?", "Four\nfive."]


def test_gpt_loader_refuses_bert_shards_and_back(bert_dir, shard_dir, shard_seq_length):
    with pytest.raises(DataError, match="bert_pairs"):
        build_loader([bert_dir / "train"], SEQ, batch_size=2)
    with pytest.raises(DataError, match="tokens"):
        build_loader([shard_dir / "train"], shard_seq_length, batch_size=2, kind="bert_pairs")


def test_tokenizer_without_mask_is_refused(small_corpus, tmp_path):
    tok = train_tokenizer([small_corpus], tmp_path / "nomask.model", vocab_size=400, special_tokens=["[CLS]", "[SEP]"])
    with pytest.raises(TokenizerError, match=r"\[MASK\].*nomask.model"):
        BertMasker.from_tokenizer(tok, SEQ)
    with pytest.raises(DataError, match="nomask.model"):
        prepare_bert_data([small_corpus], tmp_path / "out", tok, SEQ)


# --- masking ----------------------------------------------------------------------------------------------------
def test_masking_statistics_labels_and_specials(bert_dir, tok):
    m = masker(tok)
    specials = np.flatnonzero(m.special)
    mask_id = tok.token_id("[MASK]")
    chosen = replaced_mask = replaced_random = kept = candidates = 0
    for s in samples(bert_dir) * 3:  # three epochs of the same samples: dynamic masks
        s = {**s, "epoch": s["epoch"] + candidates % 7}
        out = m(s)
        ids, orig = out["input_ids"], s["tokens"][:SEQ]
        labelled = out["mlm_labels"] != IGNORE_INDEX
        changed = ids != orig
        # only masked positions have labels, and the label is the original token
        assert not (changed & ~labelled).any()
        assert (out["mlm_labels"][labelled] == orig[labelled]).all()
        # no special token (CLS, SEP, pad, ...) is ever chosen
        assert not np.isin(orig[labelled], specials).any()
        assert (ids[np.isin(orig, specials)] == orig[np.isin(orig, specials)]).all()
        n_cand = int((~np.isin(orig, specials)).sum())
        assert labelled.sum() == max(1, round(0.15 * n_cand))
        candidates += n_cand
        chosen += int(labelled.sum())
        replaced_mask += int((ids[labelled] == mask_id).sum())
        replaced_random += int(((ids != orig) & (ids != mask_id) & labelled).sum())
        kept += int((ids[labelled] == orig[labelled]).sum())
        # segment ids and padding mask
        seps = np.flatnonzero(orig == tok.token_id("[SEP]"))
        types = out["token_type_ids"]
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 : seps[1] + 1] == 1).all()
        assert (out["attention_mask"] == (orig != 0)).all()
        assert out["pair_label"] == s["tokens"][SEQ]
    assert chosen > 5000
    # per sample round(0.15 n) (at least 1, checked exactly above): short pairs round up a little overall
    assert abs(chosen / candidates - 0.15) < 0.01
    # random replacement may draw the original token (~1/V): counted as kept
    assert abs(replaced_mask / chosen - 0.8) < 0.02
    assert abs(replaced_random / chosen - 0.1) < 0.015
    assert abs(kept / chosen - 0.1) < 0.015


def test_masking_is_deterministic_per_seed_epoch_key(bert_dir, tok):
    m = masker(tok)
    s = samples(bert_dir, 1)[0]
    a, b = m(s), m(dict(s))
    assert (a["input_ids"] == b["input_ids"]).all()
    assert (m({**s, "epoch": 1})["mlm_labels"] != a["mlm_labels"]).any()  # new masks next epoch
    other_seed = BertMasker.from_tokenizer(tok, SEQ, seed=4)(s)
    assert (other_seed["mlm_labels"] != a["mlm_labels"]).any()


def test_whole_word_masking_masks_whole_words(bert_dir, tok):
    m = masker(tok, whole_word_masking=True)
    partial_words = multi_piece_words = 0
    for s in samples(bert_dir, 300):
        out = m(s)
        orig = s["tokens"][:SEQ]
        labelled = out["mlm_labels"] != IGNORE_INDEX
        for unit in m.units(orig):
            flags = labelled[unit]
            if len(unit) > 1:
                multi_piece_words += int(flags.all())
            partial_words += int(flags.any() and not flags.all())
        # a word's first piece starts with "▁" (or follows a special/newline), later pieces do not
        for unit in m.units(orig):
            assert not any(m.word_start[orig[p]] for p in unit[1:])
        assert not (np.isin(orig[labelled], np.flatnonzero(m.special))).any()
    assert partial_words == 0 and multi_piece_words > 20


def test_loader_applies_masking_and_resumes_exactly(bert_dir, tok):
    def make():
        return build_loader([bert_dir / "train"], SEQ, batch_size=4, num_workers=1, shuffle_buffer=16, seed=9,
                            sample_transform=masker(tok), kind="bert_pairs")

    loader = make()
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    state = loader.state_dict()
    rest = [next(it) for _ in range(2)]
    for name in ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "pair_label"):
        assert name in first[0], name
    assert first[0]["input_ids"].shape == (4, SEQ) and first[0]["pair_label"].shape == (4,)
    resumed = make()
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for want in rest:
        got = next(it2)
        assert got["key"] == want["key"]
        assert (got["input_ids"] == want["input_ids"]).all() and (got["mlm_labels"] == want["mlm_labels"]).all()


def test_resume_with_other_masking_settings_is_refused(bert_dir, tok, small_corpus, tokenizer_path, tmp_path):
    def make(transform, datasets=(bert_dir / "train",)):
        return build_loader(list(datasets), SEQ, batch_size=4, num_workers=1, shuffle_buffer=16, seed=9,
                            sample_transform=transform, kind="bert_pairs")

    loader = make(masker(tok))
    _ = [b for _, b in zip(range(2), loader)]
    state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
    assert state["sample_transform"]["mask_prob"] == 0.15 and state["sample_transform"]["seed"] == 3
    make(masker(tok)).load_state_dict(state)  # same settings: accepted
    cases = [
        (masker(tok, mask_prob=0.2), r"sample_transform\.mask_prob: state has 0\.15, loader has 0\.2"),
        (masker(tok, mask_token_prob=0.7), r"sample_transform\.mask_token_prob: state has 0\.8, loader has 0\.7"),
        (masker(tok, random_token_prob=0.2), r"sample_transform\.random_token_prob: state has 0\.1, loader has 0\.2"),
        (masker(tok, whole_word_masking=True),
         r"sample_transform\.whole_word_masking: state has False, loader has True"),
        (BertMasker.from_tokenizer(tok, SEQ, seed=4), r"sample_transform\.seed: state has 3, loader has 4"),
        (None, r"sample_transform: state has \{.*'transform': 'bert_masking'.*\}, loader has None"),
    ]
    for transform, message in cases:
        with pytest.raises(DataError, match=message):
            make(transform).load_state_dict(state)
    # The pair objective is written into the shards (manifest pair_objective): NSP shards fail the fingerprint.
    prepare_bert_data([small_corpus], tmp_path / "nsp", tokenizer_path, SEQ, objective="nsp", seed=5,
                      samples_per_shard=64, valid_fraction=0.2)
    with pytest.raises(DataError, match=r"datasets\[0\] .*contents differ"):
        make(masker(tok), datasets=[tmp_path / "nsp" / "train"]).load_state_dict(state)
    # A state from before the loader recorded the transform: resumed, with a warning that it cannot be checked.
    old = {k: v for k, v in state.items() if k != "sample_transform"}
    with pytest.warns(UserWarning, match="no sample_transform settings"):
        make(masker(tok, mask_prob=0.2)).load_state_dict(old)


def test_prepare_bert_cli(small_corpus, tokenizer_path, tmp_path, capsys):
    from largelm.prepare.bert_data import main

    argv = ["--input", str(small_corpus), "--tokenizer", str(tokenizer_path), "--out", str(tmp_path / "out"),
            "--seq-length", str(SEQ), "--objective", "nsp", "--samples-per-shard", "64", "--seed", "5"]
    assert main(argv) == 0
    assert f"{tmp_path / 'out' / 'train'}: " in capsys.readouterr().out
    assert read_manifest(tmp_path / "out" / "train").pair_objective == "nsp"
    assert main(argv) == 1  # already there, no --overwrite
    assert "error:" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0

import json

import pytest

from largelm.data.format import DataError
from largelm.fileio import sha256_file
from largelm.prepare.tokenizer import train_tokenizer
from largelm.tokenizer import Tokenizer, TokenizerError


def test_round_trip_on_real_text(tokenizer_path, corpus_dir):
    tok = Tokenizer.load(tokenizer_path)
    records = [json.loads(line) for line in (corpus_dir / "corpus.jsonl").read_text().splitlines()]
    # Text the tokenizer was not trained on, with verse line breaks, indentation and digits.
    text = next(r["text"] for r in records if r["source"] == "macbeth_gut.txt")[20000:24000]
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # it learned merges, not characters
    exotic = "Ünïcode ✓ — 1623\ttab  two spaces\n\nend"
    assert tok.decode(tok.encode(exotic)) == exotic  # byte fallback keeps uncovered characters


def test_special_ids(tokenizer_path):
    tok = Tokenizer.load(tokenizer_path)
    assert tok.vocab_size == 1000
    assert (tok.pad_id, tok.id_to_piece(tok.pad_id)) == (0, "<pad>")
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (1, 2, 3)
    specials = [tok.token_id(p) for p in ("[CLS]", "[SEP]", "[MASK]")]
    assert specials == [4, 5, 6]
    assert tok.encode("the [MASK] is")[2] == 6  # user-defined pieces are matched whole, never split
    newline = tok.token_id("\n")
    assert newline in tok.encode("a\nb")
    with pytest.raises(TokenizerError, match=r"'\[NOPE\]' is not in the vocabulary"):
        tok.token_id("[NOPE]")
    assert tok.sha256 == sha256_file(tokenizer_path)


def test_training_is_deterministic_and_options_apply(small_corpus, tmp_path):
    a = train_tokenizer([small_corpus], tmp_path / "a.model", vocab_size=400, special_tokens=["<mask>"])
    b = train_tokenizer([small_corpus], tmp_path / "b.model", vocab_size=400, special_tokens=["<mask>"])
    assert a.sha256 == b.sha256
    assert a.token_id("<mask>") == 4
    with pytest.raises(TokenizerError):
        a.token_id("[MASK]")  # the defaults were replaced
    c = train_tokenizer([small_corpus], tmp_path / "c.model", vocab_size=400, model_type="unigram", byte_fallback=False)
    assert c.sha256 != a.sha256 and c.vocab_size == 400
    assert c.decode(c.encode("To be, or not to be")) == "To be, or not to be"


def test_training_input_errors(tmp_path, small_corpus):
    with pytest.raises(TokenizerError, match="leaves no room"):
        train_tokenizer([small_corpus], tmp_path / "x.model", vocab_size=200)  # 256 byte pieces alone exceed it
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        train_tokenizer([bad], tmp_path / "y.model", vocab_size=300)
    with pytest.raises(DataError, match="does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "z.model")


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer.load(junk)


def test_command_line(small_corpus, tmp_path, capsys):
    from largelm.prepare.tokenizer import main

    assert main(["--input", str(small_corpus), "--out", str(tmp_path / "cli.model"), "--vocab-size", "500"]) == 0
    assert Tokenizer.load(tmp_path / "cli.model").vocab_size == 500
    assert main(["--input", str(small_corpus), "--out", str(tmp_path / "tokdir"), "--vocab-size", "500"]) == 0
    assert Tokenizer.load(tmp_path / "tokdir" / "spm.model").sha256 == Tokenizer.load(tmp_path / "cli.model").sha256
    assert main(["--input", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x.model")]) == 1
    assert "does not exist" in capsys.readouterr().err

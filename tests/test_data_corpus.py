import io
import json
import tarfile

import pytest

from largelm.data.format import DataError
from largelm.fileio import sha256_file
from largelm.prepare import corpus
from largelm.prepare.corpus import build_default_corpus, clean_text, read_sdist_texts, strip_gutenberg_boilerplate


def test_default_corpus_contents_match_metadata(corpus_dir):
    records = [json.loads(line) for line in (corpus_dir / "corpus.jsonl").read_text().splitlines()]
    meta = json.loads((corpus_dir / "metadata.json").read_text())
    assert meta["sdist_sha256"] == corpus.SDIST_SHA256
    assert meta["num_documents"] == len(records) == len(meta["files"])
    assert meta["num_text_bytes"] == sum(len(r["text"].encode()) for r in records)
    assert meta["corpus_sha256"] == sha256_file(corpus_dir / "corpus.jsonl")
    sources = [r["source"] for r in records]
    assert len(set(sources)) == len(sources)
    assert "hamlet_gut.txt" in sources and "paradise_regained_gut.txt" in sources and "britannica-11th.txt" in sources
    assert not any(s.endswith("_gut_f.txt") for s in sources)  # First-Folio duplicates are skipped
    assert meta["num_text_bytes"] > 5_000_000  # the whole selection, not a slice
    hamlet = next(r["text"] for r in records if r["source"] == "hamlet_gut.txt")
    assert "To be, or not to be" in hamlet
    for r in records:
        assert "\r" not in r["text"] and "\ufeff" not in r["text"] and r["text"].strip()
    brit = next(r["text"] for r in records if r["source"] == "britannica-11th.txt")
    assert "### START" not in brit and "#### Source" not in brit


def test_second_build_is_a_no_op(corpus_dir, monkeypatch):
    before = (corpus_dir / "corpus.jsonl").stat().st_mtime_ns
    monkeypatch.setattr(corpus, "download_sdist", lambda *a: pytest.fail("must not download again"))
    assert build_default_corpus(corpus_dir) == corpus_dir / "corpus.jsonl"
    assert (corpus_dir / "corpus.jsonl").stat().st_mtime_ns == before


def test_gutenberg_boilerplate_is_stripped():
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\nLicence blah\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nACT I.  \r\nWho's there?\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nMore licence\r\n"
    )
    assert clean_text(raw) == "ACT I.\nWho's there?\n"
    assert strip_gutenberg_boilerplate("no markers at all") == "no markers at all"
    marked = "### START: x.tif.txt ###\np.772:0\nShakespeare, William\n"
    assert clean_text(marked, scan_markers=True) == "Shakespeare, William\n"


def test_sdist_checksum_mismatch_is_refused(tmp_path):
    fake = tmp_path / corpus.SDIST_FILE
    fake.write_bytes(b"not the real package")
    with pytest.raises(DataError, match="does not match the pinned"):
        corpus.check_sdist_sha256(fake)


def test_unsafe_member_paths_are_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"pwned"
        info = tarfile.TarInfo("shakespeare-0.6/../../etc/evil_gut.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="unsafe member path"):
        read_sdist_texts(archive)

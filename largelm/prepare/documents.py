"""Reading input documents from plain-text and JSON-lines files.

* ``*.txt``: the whole file is one document (UTF-8).
* ``*.jsonl``: one JSON object per line; the document text is ``record[text_field]``. Blank lines are allowed
  (they hold no record); anything else that is not an object with a string ``text_field`` is an error that
  names the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from largelm.data.format import DataError

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "file" or "file:line", for messages and provenance


def check_input_files(paths: Iterable[str | Path]) -> list[Path]:
    """Resolve the input list up-front so a typo fails before any work is done."""
    files = [Path(p) for p in paths]
    if not files:
        raise DataError("no input files given")
    for path in files:
        if not path.is_file():
            raise DataError(f"input {path} does not exist or is not a file")
        if not path.name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
            raise DataError(f"input {path}: unsupported file type (expected .txt or .jsonl)")
    return files


def iter_documents(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[Document]:
    for path in check_input_files(paths):
        if path.name.endswith(JSONL_SUFFIXES):
            yield from _iter_jsonl(path, text_field)
        else:
            yield Document(_read_text(path), str(path))


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from None


def _iter_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 (bad byte at column {err.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON: {err.msg} at column {err.colno}") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if text_field not in record:
                raise DataError(f"{where}: no field {text_field!r} (fields: {sorted(record)})")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
            yield Document(text, where)

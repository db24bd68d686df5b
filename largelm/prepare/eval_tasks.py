"""A small lm-evaluation-harness task set built from the corpus's held-out documents (no dataset hub needed).

The held-out documents are the ``valid`` split of ``largelm-prepare-data`` (the ``valid_fraction`` of documents
whose text hashes lowest, ``gpt_data.valid_cutoff``; the quickstart uses 0.01), so a model trained on the
quickstart shards never saw them. From their lines (stripped, at least ``MIN_WORDS`` words) it writes, seeded:

* ``largelm_next_line`` (multiple choice): two lines of context; the true next line against ``DISTRACTORS``
  other held-out lines. Metrics acc, acc_norm.
* ``largelm_last_word`` (loglikelihood, like LAMBADA): a line without its last word; the last word is the
  target. Metrics perplexity, acc (the word is the greedy continuation).
* ``largelm_perplexity`` (loglikelihood_rolling): held-out passages of up to ``PASSAGE_CHARS`` characters.
  Metrics word_perplexity, byte_perplexity, bits_per_byte.
* ``largelm_next_line_gen`` (generate_until): two lines of context; greedy generation up to the newline
  must equal the next line. Metric exact_match.

Each task is ``<name>.jsonl`` + ``<name>.yaml`` (``dataset_path: json`` over the jsonl by absolute path: move
the directory and write it again), all tagged ``largelm_heldout``; ``tasks.json`` records the source and counts.
Every file is written atomically. The same corpus, fraction and seed give the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import yaml

from largelm.config import BUNDLED_EVAL_TASKS, EVAL_TASK_TAG
from largelm.data.format import DataError
from largelm.fileio import write_text_atomic
from largelm.prepare.documents import check_input_files, iter_documents
from largelm.prepare.gpt_data import document_bucket, valid_cutoff

MIN_WORDS = 4
DISTRACTORS = 3
PASSAGE_CHARS = 1500
DEFAULT_COUNTS = {"largelm_next_line": 400, "largelm_last_word": 400, "largelm_perplexity": 40,
                  "largelm_next_line_gen": 100}
assert set(DEFAULT_COUNTS) == set(BUNDLED_EVAL_TASKS)


def held_out_documents(inputs: Sequence[str | Path], valid_fraction: float = 0.01, text_field: str = "text") -> list:
    """The texts ``prepare_data(..., valid_fraction)`` puts into ``valid``, in input order."""
    files = check_input_files(inputs)
    buckets = [document_bucket(d.text) for d in iter_documents(files, text_field) if d.text.strip()]
    cutoff = valid_cutoff(buckets, valid_fraction)
    if cutoff is None:
        raise DataError(f"valid_fraction={valid_fraction}: no held-out documents (it must be > 0)")
    return [d.text for d in iter_documents(files, text_field) if d.text.strip() and document_bucket(d.text) <= cutoff]


def _lines(texts: list[str]) -> list[list[str]]:
    """Per document, its usable lines in order (blank lines and short lines such as stage directions dropped)."""
    return [[ln.strip() for ln in t.splitlines() if len(ln.split()) >= MIN_WORDS] for t in texts]


def _passages(texts: list[str]) -> list[str]:
    out = []
    for text in texts:
        chunk = ""
        for para in text.split("\n\n"):
            if chunk and len(chunk) + len(para) > PASSAGE_CHARS:
                out.append(chunk.strip())
                chunk = ""
            chunk += para + "\n\n"
        if chunk.strip():
            out.append(chunk.strip()[:PASSAGE_CHARS])
    return [p for p in out if len(p.split()) >= MIN_WORDS]


def build_docs(texts: list[str], seed: int = 1234, counts: dict | None = None) -> dict[str, list[dict]]:
    """task name -> its documents (dicts), from the held-out ``texts``."""
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    rng = random.Random(seed)
    per_doc = _lines(texts)
    every_line = [ln for lines in per_doc for ln in lines]
    windows = [(lines[i - 2], lines[i - 1], lines[i]) for lines in per_doc for i in range(2, len(lines))]
    if len(windows) < 2 or len(every_line) <= DISTRACTORS:
        raise DataError(f"the held-out documents have too few lines of >= {MIN_WORDS} words to build tasks "
                        f"({len(every_line)} lines)")
    picked = rng.sample(windows, min(counts["largelm_next_line"], len(windows)))
    next_line = []
    for a, b, true in picked:
        distractors = []
        while len(distractors) < DISTRACTORS:
            cand = rng.choice(every_line)
            if cand != true and cand not in distractors:
                distractors.append(cand)
        choices = [true] + distractors
        rng.shuffle(choices)
        next_line.append({"context": f"{a}\n{b}", "choices": choices, "label": choices.index(true)})
    last_word = [{"context": ln.rsplit(" ", 1)[0], "target": " " + ln.rsplit(" ", 1)[1]}
                 for ln in rng.sample(every_line, min(counts["largelm_last_word"], len(every_line)))]
    passages = _passages(texts)
    perplexity = [{"text": p} for p in rng.sample(passages, min(counts["largelm_perplexity"], len(passages)))]
    gen = [{"context": f"{a}\n{b}", "target": true}
           for a, b, true in rng.sample(windows, min(counts["largelm_next_line_gen"], len(windows)))]
    return {"largelm_next_line": next_line, "largelm_last_word": last_word, "largelm_perplexity": perplexity,
            "largelm_next_line_gen": gen}


def task_yaml(name: str, data_file: Path) -> dict:
    """The lm-eval task config of bundled task ``name`` over ``data_file``."""
    common = {"task": name, "tag": [EVAL_TASK_TAG], "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}}, "test_split": "test",
              "metadata": {"version": 1.0}}
    if name == "largelm_next_line":
        # "context\n" + choice: lm-eval moves the context's trailing newline to the continuation, for every model
        return {**common, "output_type": "multiple_choice", "doc_to_text": "{{context}}\n", "doc_to_choice": "choices",
                "doc_to_target": "label", "target_delimiter": "",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    if name == "largelm_last_word":
        return {**common, "output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{target}}",
                "target_delimiter": "",
                "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    if name == "largelm_perplexity":
        return {**common, "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity",
                                 "higher_is_better": False},
                                {"metric": "byte_perplexity", "aggregation": "weighted_perplexity",
                                 "higher_is_better": False},
                                {"metric": "bits_per_byte", "aggregation": "bits_per_byte",
                                 "higher_is_better": False}]}
    if name == "largelm_next_line_gen":
        return {**common, "output_type": "generate_until", "doc_to_text": "{{context}}\n",
                "doc_to_target": "{{target}}",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 24, "do_sample": False},
                "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                              {"function": "take_first"}]}],
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    raise KeyError(name)


def make_eval_tasks(inputs: Sequence[str | Path], out_dir: str | Path, *, valid_fraction: float = 0.01,
                    seed: int = 1234, counts: dict | None = None, text_field: str = "text") -> dict[str, int]:
    """Write the bundled task set into ``out_dir``; returns task name -> number of documents."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = build_docs(held_out_documents(inputs, valid_fraction, text_field), seed, counts)
    for name, rows in docs.items():
        data_file = out_dir / f"{name}.jsonl"
        write_text_atomic(data_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        write_text_atomic(out_dir / f"{name}.yaml", yaml.safe_dump(task_yaml(name, data_file), sort_keys=False,
                                                                    allow_unicode=True))
    sizes = {name: len(rows) for name, rows in docs.items()}
    record = {"inputs": [str(Path(p).resolve()) for p in inputs], "valid_fraction": valid_fraction, "seed": seed,
              "documents": sizes}
    write_text_atomic(out_dir / "tasks.json", json.dumps(record, indent=1) + "\n")
    return sizes

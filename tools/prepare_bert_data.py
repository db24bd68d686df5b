#!/usr/bin/env python
"""Tokenize documents into BERT sentence-pair shards (same as the `largelm-prepare-bert-data` console script)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from largelm.prepare.bert_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

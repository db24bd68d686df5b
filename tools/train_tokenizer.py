#!/usr/bin/env python
"""Train a sentencepiece tokenizer (same as the `largelm-train-tokenizer` console script)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from largelm.prepare.tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

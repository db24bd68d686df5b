#!/usr/bin/env python
"""Tokenize documents into packed webdataset shards (same as the `largelm-prepare-data` console script)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from largelm.prepare.gpt_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

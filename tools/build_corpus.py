#!/usr/bin/env python
"""Build the default Shakespeare/Milton corpus (same as the `largelm-build-corpus` console script)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from largelm.prepare.corpus import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

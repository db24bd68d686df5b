#!/usr/bin/env python
"""Convert checkpoints: consolidate, reshard, export to / import from Hugging Face (same as `largelm-convert`).

    python tools/convert_checkpoint.py --help
    python tools/convert_checkpoint.py consolidate runs/gpt-tiny/checkpoints out/gpt-tiny
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from largelm.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

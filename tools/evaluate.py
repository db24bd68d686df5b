#!/usr/bin/env python
"""lm-evaluation-harness on a largelm checkpoint (same as the `largelm-eval` console script).

    python tools/evaluate.py --make-tasks
    python tools/evaluate.py --checkpoint runs/gpt-tiny/checkpoints --tasks largelm_next_line --limit 100
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from largelm.evaluate.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

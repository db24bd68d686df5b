#!/usr/bin/env python
"""Per-rank entry script for launchers that take a script path:

    deepspeed --num_gpus 8 --hostfile launch/hostfile.example launch/train.py --config configs/gpt-125m.yaml
    torchrun --nproc-per-node 8 launch/train.py --config configs/gpt-125m.yaml

Same as ``python -m largelm.train.main`` / ``largelm-train``.
"""

import sys

from largelm.train.main import main

if __name__ == "__main__":
    sys.exit(main())

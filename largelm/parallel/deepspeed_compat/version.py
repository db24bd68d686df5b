"""The DeepSpeed version every patch of ``largelm.parallel.deepspeed_compat`` was written and checked against."""

from __future__ import annotations

from typing import Optional

import deepspeed

DEEPSPEED_VERSION = "0.19.8"  # pyproject.toml pins the same


def check_deepspeed_version(installed: Optional[str] = None) -> str:
    """Refuse to patch a DeepSpeed other than ``DEEPSPEED_VERSION``: the patches replace private internals (method
    names, attribute layouts) that another version may have changed silently. ``installed`` defaults to
    ``deepspeed.__version__``; returns it."""
    installed = deepspeed.__version__ if installed is None else installed
    if installed != DEEPSPEED_VERSION:
        raise RuntimeError(
            f"largelm.parallel.deepspeed_compat was written for DeepSpeed {DEEPSPEED_VERSION}, but DeepSpeed "
            f"{installed} is installed: its patches replace DeepSpeed internals that may differ in {installed}. "
            f"Install deepspeed=={DEEPSPEED_VERSION} (pyproject.toml), or check every entry of "
            f"largelm.parallel.deepspeed_compat.PATCHES against {installed} and update DEEPSPEED_VERSION"
        )
    return installed

"""Parallel building blocks (process groups, sharding, DeepSpeed config) and every adaptation largelm makes to the
libraries it trains with, each in one home with a ``PATCHES`` table:

* ``cpu_compat``: megatron-core on a machine without CUDA (process-wide, only without CUDA);
* ``megatron_compat``: megatron-core module globals swapped while a model is built;
* ``deepspeed_compat``: DeepSpeed's engine, optimizers, checkpoint loading and launcher.

``ALL_PATCHES`` joins the three tables; ``python -m largelm.parallel`` prints it (docs/design.md "Library
adaptations").
"""

from __future__ import annotations


def __getattr__(name: str):
    # Built on first use: importing any largelm.parallel module must not import megatron-core and DeepSpeed
    # (the launcher imports this package before either is needed).
    if name == "ALL_PATCHES":
        from largelm.parallel import cpu_compat, deepspeed_compat, megatron_compat  # lazy (megatron + DeepSpeed)

        return cpu_compat.PATCHES + megatron_compat.PATCHES + deepspeed_compat.PATCHES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

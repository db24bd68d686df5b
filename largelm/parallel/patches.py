"""What one entry of a compatibility layer's ``PATCHES`` table says (``cpu_compat``, ``deepspeed_compat``,
``megatron_compat``; ``largelm.parallel.ALL_PATCHES`` joins them, ``python -m largelm.parallel`` prints them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Patch:
    """One replaced or wrapped library attribute.

    ``name``: short name (what ``install_deepspeed_compat`` returns and logs). ``library``: the library and the
    version the patch was written for. ``target``: the attribute replaced or wrapped. ``replaces``: what the
    library does there. ``why``: what goes wrong (or costs time) without the patch. ``when``: the runs it applies to
    (ZeRO stage x precision x DP x PP x clipping, or device). ``scope``: who installs it and for how long
    (``engine``: ``install_deepspeed_compat`` on each new engine;
    ``engine build``: around ``deepspeed.initialize``; ``process``: once per process; ``checkpoint``,
    ``launcher``, ``model build``: a context around that operation). ``test``: the pytest node id that pins it.
    """

    name: str
    library: str
    target: str
    replaces: str
    why: str
    when: str
    scope: str
    test: str

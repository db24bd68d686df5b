"""megatron-core's import-time ``torch.compile``, deferred to the first call.

megatron-core 0.16.1 sets ``megatron.core.jit.jit_fuser = torch.compile`` and decorates ~40 fusion functions with it
while ``megatron.core`` is imported. The first ``torch.compile`` call imports torch._dynamo and inductor: seconds in
every process that imports megatron (each rank of each launch, each tool), about half of megatron's import time,
although on CPU none of those functions ever runs (largelm turns the fusions off there: model/specs.kernel_fusions).

``install()`` (called by ``largelm/__init__.py``, so before anything in a largelm process imports megatron) adds an
import hook for the one module ``megatron.core.jit``: once it has run, its ``jit_fuser`` is ``lazy_compile``, which
returns a function that calls ``torch.compile(fn)`` on its first call and the compiled function from then on. On a
GPU the same compiled functions run, compiled at first use instead of at import. ``torch.compile`` itself is not
touched. Listed in ``largelm.parallel.megatron_compat.PATCHES``; ``uninstall()`` removes the hook (modules already
imported keep what they got).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from typing import Callable, Optional

TARGET = "megatron.core.jit"


def lazy_compile(fn: Optional[Callable] = None, **options) -> Callable:
    """``torch.compile(fn, **options)``, compiled when the returned function is first called."""
    if fn is None:  # used as @jit_fuser(...) with options
        return functools.partial(lazy_compile, **options)
    compiled: Optional[Callable] = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            import torch  # lazy (imported by megatron long before any fused function runs)

            compiled = torch.compile(fn, **options)
        return compiled(*args, **kwargs)

    call.lazily_compiled = fn
    return call


class _DeferCompile(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``megatron.core.jit`` with the normal path finder, runs it, then swaps its ``jit_fuser``."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        torch = sys.modules.get("torch")
        if torch is not None and getattr(module, "jit_fuser", None) is torch.compile:
            module.jit_fuser = lazy_compile


_HOOK = _DeferCompile()


def install() -> None:
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)

"""largelm/megatron_jit.py: megatron-core's import-time torch.compile is deferred to each function's first call."""

from __future__ import annotations

import subprocess
import sys

import torch

from largelm.megatron_jit import lazy_compile

PROBE = """
import sys, torch, largelm
import megatron.core, megatron.core.models.gpt
from megatron.core import jit
from megatron.core.fusions import fused_bias_gelu
print('dynamo imported:', 'torch._dynamo' in sys.modules)
print('jit_fuser lazy:', jit.jit_fuser.__name__ == 'lazy_compile')
print('fusion wrapped:', hasattr(fused_bias_gelu.bias_gelu, 'lazily_compiled'))
"""


def test_megatron_imports_without_compiling_and_compiles_on_first_call():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert "dynamo imported: False" in out and "jit_fuser lazy: True" in out and "fusion wrapped: True" in out, out

    calls = []

    def f(x):
        calls.append(1)
        return x * 2 + 1

    g = lazy_compile(f, backend="eager")  # eager: dynamo traces, no C++ compile in a unit test
    assert g.__name__ == "f" and not calls  # nothing compiled or run yet
    x = torch.arange(4.0)
    assert torch.equal(g(x), x * 2 + 1) and torch.equal(g(x), x * 2 + 1)
    assert "torch._dynamo" in sys.modules  # compiled through torch.compile at the first call
    assert lazy_compile(backend="eager")(f)(x).tolist() == (x * 2 + 1).tolist()  # the @jit_fuser(...) form

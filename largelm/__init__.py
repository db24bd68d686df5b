"""largelm: distributed GPT/BERT pretraining on megatron-core + DeepSpeed, runnable on CPU."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core warns on every import that the optional CUDA extensions are absent; largelm uses its local
# (torch) implementations on purpose (docs/design.md), so the warning says nothing to our users.
_warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")

# Before anything imports megatron-core: its import-time torch.compile calls are deferred to first use (seconds off
# every process's start-up; largelm/megatron_jit.py says why).
from largelm import megatron_jit as _megatron_jit  # noqa: E402

_megatron_jit.install()

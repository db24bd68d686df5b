"""Post-training weight-only quantization (int8 per-channel, int4 group-wise; RTN or GPTQ) of largelm GPT models.

See largelm/quant/model.py for the checkpoint format and docs/design.md "Quantization" for the choices.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Iterator

from largelm.parallel import groups
from largelm.parallel.cpu_compat import model_parallel_manual_seed
from largelm.quant.core import QuantFormat, QuantizationError, QuantizedWeight, quantize_gptq, quantize_rtn
from largelm.quant.model import (
    QuantLinear,
    build_model,
    compare_tokens_per_s,
    load_quantized,
    perplexity,
    quantize_model,
    save_quantized,
)


@contextlib.contextmanager
def single_process_parallel_state(seed: int = 0) -> Iterator[None]:
    """A one-rank gloo world with megatron parallel_state at TP=1/PP=1 (for tools running a model in-process).
    Does nothing if a process group already exists."""
    import torch.distributed as dist


    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    groups.init_distributed("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        groups.init_model_parallel(1, 1)

        model_parallel_manual_seed(seed)  # megatron's attention forks the model-parallel RNG stream
        yield
    finally:
        groups.destroy()


__all__ = [
    "QuantFormat", "QuantLinear", "QuantizationError", "QuantizedWeight", "build_model", "compare_tokens_per_s",
    "load_quantized", "perplexity", "quantize_gptq", "quantize_model", "quantize_rtn", "save_quantized",
    "single_process_parallel_state",
]

"""Register largelm checkpoints with lm-eval as the model ``largelm``, and the one-rank world they run in.

A training checkpoint of any layout, a consolidated directory, a Hugging Face directory or a quantized checkpoint
is loaded by ``largelm.generation.load.load_causal_lm`` (the loader ``largelm-generate`` uses) into one TP=1
GPTModel in fp32 on a one-rank gloo world. After ``import largelm.evaluate.model``,
``lm_eval.simple_evaluate(model="largelm", model_args="checkpoint=DIR,batch_size=8")`` works like any lm-eval model
name.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from lm_eval.api.registry import register_model

from largelm.convert import verify
from largelm.generation.load import load_causal_lm
from largelm.model.harness import LargelmLM, offline_hub


@contextlib.contextmanager
def single_rank() -> Iterator[None]:
    """A one-rank gloo world with megatron parallel_state at TP=1/PP=1 (reused if one is already set up)."""
    with verify.single_rank_group():
        yield


@register_model("largelm")
class LargelmCheckpointLM(LargelmLM):
    """``--model largelm --model_args checkpoint=DIR[,batch_size=B,tokenizer=PATH]``: sets up its own one-rank
    world if none exists (kept for the life of the process)."""

    def __init__(self, checkpoint: str, tokenizer: Optional[str] = None, batch_size: int | str = 8,
                 max_length: Optional[int] = None, **_ignored):
        offline_hub()
        self._world = contextlib.ExitStack()
        self._world.enter_context(single_rank())
        loaded = load_causal_lm(checkpoint, tokenizer=tokenizer)
        self.loaded = loaded
        super().__init__(loaded.module, loaded.tokenizer, max_length=int(max_length or loaded.context),
                         batch_size=int(batch_size) if str(batch_size).isdigit() else 8)

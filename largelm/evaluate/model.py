"""Open any largelm checkpoint as an lm-eval model, and register it with lm-eval as ``largelm``.

A training checkpoint of any layout (root or step directory; ZeRO partitions merged, TP/PP unsharded), a
consolidated directory or a Hugging Face directory is read through the converter's sources
(largelm/convert/source.py) into the consolidated form, then loaded into one TP=1 GPTModel in fp32 on a one-rank
gloo world. After ``import largelm.evaluate.model``, ``lm_eval.simple_evaluate(model="largelm",
model_args="checkpoint=DIR,batch_size=8")`` works like any lm-eval model name.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from lm_eval.api.registry import register_model

from largelm.checkpoint.consolidated import Consolidated
from largelm.config import ParallelConfig
from largelm.convert import verify
from largelm.convert.source import open_source
from largelm.errors import ConversionError
from largelm.model.harness import LargelmLM, offline_hub
from largelm.model.registry import get_arch
from largelm.tokenizer import Tokenizer


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module
    tokenizer: Tokenizer
    consolidated: Consolidated
    path: Path  # the step directory of a training checkpoint, else the directory given
    kind: str  # "checkpoint" | "consolidated" | "hf"


def tokenizer_of(c: Consolidated, override: Optional[str | Path] = None) -> Path:
    path = override or c.tokenizer or (c.config.tokenizer.model if c.config is not None else None)
    if path is None:
        raise ConversionError("the checkpoint names no tokenizer: pass --tokenizer path/to/spm.model")
    return Path(path)


def load_checkpoint(path: str | Path, tokenizer: Optional[str | Path] = None, log=print) -> LoadedCheckpoint:
    """The checkpoint's whole model (fp32, eval mode) and tokenizer; needs a TP=1 parallel_state (see
    ``single_rank``). Refuses models that are not causal LMs (BERT)."""
    src = open_source(path, checksums=False, log=log)
    c = src.consolidated()
    if not get_arch(c.model.arch).causal_lm:
        raise ConversionError(f"{path}: model.arch {c.model.arch!r} is not a causal language model; lm-eval's "
                              "tasks score next-token predictions")
    model = verify.build_model(c.model, ParallelConfig(), owner=c)
    verify.load_native(model, {k: v.float() for k, v in c.padded_tensors(c.model.padded_vocab_size(1)).items()},
                       str(path))
    tok = Tokenizer.load(tokenizer_of(c, tokenizer))
    if tok.vocab_size != c.model.vocab_size:
        raise ConversionError(f"tokenizer {tok.path} has {tok.vocab_size} pieces, the model's vocabulary is "
                              f"{c.model.vocab_size}: not the tokenizer it was trained with")
    where = src.info.path if src.kind == "checkpoint" else Path(path)
    return LoadedCheckpoint(model.eval(), tok, c, Path(where), src.kind)


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
        loaded = load_checkpoint(checkpoint, tokenizer, log=lambda _: None)
        self.loaded = loaded
        super().__init__(loaded.model, loaded.tokenizer, max_length=int(max_length or
                                                                         loaded.consolidated.model.seq_length),
                         batch_size=int(batch_size) if str(batch_size).isdigit() else 8)

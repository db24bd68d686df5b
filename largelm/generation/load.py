"""The one loader of "any checkpoint -> TP=1 causal LM + tokenizer", shared by ``largelm-generate``,
``largelm-serve`` and ``largelm-eval`` (largelm/evaluate).

Sources: a training checkpoint of any layout (root -> its latest, or a ``step_XXXXXXXX`` directory; any
TP/PP/DP/ZeRO), a consolidated directory, a Hugging Face directory (the ones ``largelm-convert`` reads, through its
``open_source``), or a quantized checkpoint (``quant.json``, ``tools/quantize.py``; ``largelm.quant.load_quantized``).

Training checkpoints are consolidated to full TP=1 weights by the checkpoint converter and loaded into a TP=1
model of the checkpoint's shape on this process (``groups.device()``: the GPU when there is one), so a layout
that was trained on 8 ranks runs on one. Needs a one-rank world with megatron parallel_state at TP=1
(``largelm.quant.single_process_parallel_state`` or ``largelm.evaluate.model.single_rank``). Refuses models that are
not causal language models (BERT) and tokenizers with more pieces than the model's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from largelm.config import ModelConfig, ParallelConfig
from largelm.convert.source import open_source
from largelm.errors import ConversionError
from largelm.model.registry import get_arch
from largelm.model.weights import load_full_state_dict
from largelm.quant import load_quantized
from largelm.quant.model import META as QUANT_META
from largelm.tokenizer import Tokenizer


class ModelLoadError(ValueError):
    """The source cannot be run as a causal language model: not one (BERT), no tokenizer, unreadable."""


@dataclass
class LoadedModel:
    module: torch.nn.Module  # a GPTModel (TP=1, eval mode)
    model: ModelConfig
    tokenizer: Tokenizer
    describe: str  # what was loaded, for the user
    path: Path  # the step directory of a training checkpoint, else the directory given
    kind: str  # "checkpoint" | "consolidated" | "hf" | "quantized"
    step: Optional[int] = None  # the training step the weights are from, when recorded

    @property
    def context(self) -> int:
        """Positions the model was trained on: the window generation keeps, lm-eval's max_length."""
        return self.model.seq_length


def _check_causal(model: ModelConfig, path: Path) -> None:
    if not get_arch(model.arch).causal_lm:
        raise ModelLoadError(f"{path} holds a model.arch={model.arch!r} model, which is not a causal language model: "
                             "generation and lm-eval's tasks need next-token predictions (gpt2 and llama style GPTs)")


def _tokenizer(explicit: Optional[Path], recorded: Optional[Path], path: Path) -> Tokenizer:
    """``explicit`` (--tokenizer) or else the one the source records; a ModelLoadError if neither is a file."""
    candidate = explicit or recorded
    if candidate is None or not Path(candidate).is_file():
        where = f"the recorded tokenizer {recorded} does not exist" if recorded else "it records no tokenizer"
        if explicit:
            where = f"--tokenizer {explicit} does not exist"
        raise ModelLoadError(f"no tokenizer for {path}: {where} (pass the sentencepiece model with --tokenizer)")
    return Tokenizer.load(candidate)


def _check_vocab(tok: Tokenizer, model: ModelConfig, path: Path) -> Tokenizer:
    if tok.vocab_size > model.vocab_size:
        raise ModelLoadError(f"tokenizer {tok.path} has {tok.vocab_size} tokens, more than the model at {path} "
                             f"(vocab_size {model.vocab_size}): not the tokenizer it was trained with")
    return tok


def _check_tensor_parallel(model: ModelConfig, tensor_parallel: int, path: Path) -> None:
    for what, count in (("num_attention_heads", model.num_attention_heads), ("num_query_groups", model.kv_groups)):
        if count % tensor_parallel:
            raise ModelLoadError(f"{path}: the model's {what}={count} is not divisible by {tensor_parallel} "
                                 "tensor-parallel ranks")


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, tokenizer: Optional[str | Path] = None,
                   log=lambda _msg: None, tensor_parallel: int = 1) -> LoadedModel:
    """The model at ``path`` (see the module docstring) in ``dtype``, eval mode, with its tokenizer (or
    ``tokenizer``). ``tensor_parallel`` > 1: this rank's TP shard of it (megatron parallel_state must be set up at
    that TP size; not for quantized checkpoints)."""
    path = Path(path)
    tokenizer = Path(tokenizer) if tokenizer is not None else None
    if not path.exists():
        raise ModelLoadError(f"checkpoint {path} does not exist")
    if (path / QUANT_META).is_file() and tensor_parallel > 1:
        raise ModelLoadError(f"{path} is a quantized checkpoint: it runs on one process (no tensor parallelism)")
    if (path / QUANT_META).is_file():
        module, cfg = load_quantized(path, dtype)
        _check_causal(cfg.model, path)
        tok = _check_vocab(_tokenizer(tokenizer, Path(cfg.tokenizer.model), path), cfg.model, path)
        return LoadedModel(module.eval(), cfg.model, tok, f"quantized checkpoint {path}", path, "quantized")
    source = open_source(path, checksums=False, log=log)
    if source.kind == "checkpoint":  # refuse BERT before consolidating its weights
        _check_causal(source.info.config.model, path)
    c = source.consolidated()
    _check_causal(c.model, path)
    recorded = c.tokenizer or (Path(c.config.tokenizer.model) if c.config is not None else None)
    tok = _check_vocab(_tokenizer(tokenizer, recorded, path), c.model, path)
    _check_tensor_parallel(c.model, tensor_parallel, path)
    module = get_arch(c.model.arch).build_model(c.model, ParallelConfig(tensor_parallel=tensor_parallel), dtype=dtype)
    try:  # full weights, padded as for this TP size; each rank keeps its shard
        load_full_state_dict(module, c.padded_tensors(c.model.padded_vocab_size(tensor_parallel)))
    except KeyError as err:
        raise ConversionError(f"{path}: {err}") from None
    where = source.info.path if source.kind == "checkpoint" else path
    return LoadedModel(module.eval(), c.model, tok, source.describe(), Path(where), source.kind, c.step)

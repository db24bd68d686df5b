"""A model ready to generate from whatever a user points at: a training checkpoint of any layout (root -> its
latest, or a ``step_XXXXXXXX`` directory; any TP/PP/DP/ZeRO), a consolidated directory, a Hugging Face directory
(the ones ``largelm-convert`` reads, through its ``open_source``), or a quantized checkpoint (``quant.json``,
``tools/quantize.py``; ``largelm.quant.load_quantized``).

Training checkpoints are consolidated to full TP=1 weights by the checkpoint converter and loaded into a TP=1
model of the checkpoint's shape on this process (``groups.device()``: the GPU when there is one), so a layout
that was trained on 8 ranks generates on one. Needs a one-rank world with megatron parallel_state
(``largelm.quant.single_process_parallel_state``).
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


class GenerationError(ValueError):
    """The source cannot generate text: not a causal language model, no tokenizer, unreadable."""


@dataclass
class LoadedModel:
    module: torch.nn.Module  # a GPTModel (TP=1, eval mode)
    model: ModelConfig
    tokenizer: Tokenizer
    describe: str  # what was loaded, for the user

    @property
    def context(self) -> int:
        """Positions the model was trained on: the window generation keeps."""
        return self.model.seq_length


def _check_generative(model: ModelConfig, path: Path) -> None:
    if not get_arch(model.arch).causal_lm:
        raise GenerationError(f"{path} holds a model.arch={model.arch!r} model, which is not a generative (causal) "
                              "language model: largelm-generate runs GPT checkpoints (gpt2 and llama style)")


def _tokenizer(explicit: Optional[Path], recorded: Optional[Path], path: Path) -> Tokenizer:
    """``explicit`` (--tokenizer) or else the one the source records; a GenerationError if neither is a file."""
    candidate = explicit or recorded
    if candidate is None or not Path(candidate).is_file():
        where = f"the recorded tokenizer {recorded} does not exist" if recorded else "it records no tokenizer"
        if explicit:
            where = f"--tokenizer {explicit} does not exist"
        raise GenerationError(f"no tokenizer for {path}: {where} (pass the sentencepiece model with --tokenizer)")
    return Tokenizer.load(candidate)


def _check_vocab(tok: Tokenizer, model: ModelConfig, path: Path) -> Tokenizer:
    if tok.vocab_size > model.vocab_size:
        raise GenerationError(f"tokenizer {tok.path} has {tok.vocab_size} tokens, more than the model at {path} "
                              f"(vocab_size {model.vocab_size}): not the tokenizer it was trained with")
    return tok


def load_for_generation(path: str | Path, dtype: torch.dtype = torch.float32, tokenizer: Optional[Path] = None,
                        log=lambda _msg: None) -> LoadedModel:
    """The model at ``path`` (see the module docstring) in ``dtype``, with its tokenizer (or ``tokenizer``)."""
    path = Path(path)
    if not path.exists():
        raise GenerationError(f"checkpoint {path} does not exist")
    if (path / QUANT_META).is_file():
        module, cfg = load_quantized(path, dtype)
        tok = _check_vocab(_tokenizer(tokenizer, Path(cfg.tokenizer.model), path), cfg.model, path)
        return LoadedModel(module, cfg.model, tok, f"quantized checkpoint {path}")
    source = open_source(path, checksums=False, log=log)
    if source.kind == "checkpoint":  # refuse BERT before consolidating its weights
        _check_generative(source.info.config.model, path)
    c = source.consolidated()
    _check_generative(c.model, path)
    recorded = c.tokenizer or (Path(c.config.tokenizer.model) if c.config is not None else None)
    tok = _check_vocab(_tokenizer(tokenizer, recorded, path), c.model, path)
    arch = get_arch(c.model.arch)
    module = arch.build_model(c.model, ParallelConfig(), dtype=dtype)
    try:
        load_full_state_dict(module, c.padded_tensors(c.model.padded_vocab_size(1)))
    except KeyError as err:
        raise ConversionError(f"{path}: {err}") from None
    return LoadedModel(module.eval(), c.model, tok, source.describe())

"""What every Hugging Face -> megatron import finishes with: the output head and a check that nothing is left over."""

from __future__ import annotations

from typing import Callable

import torch

from largelm.checkpoint.convert.errors import UnsupportedArchitecture


def finish_import(out: dict, sd: dict, used: set, take: Callable[[str], torch.Tensor], tied: bool,
                  embedding_name: str, family: str) -> dict[str, torch.Tensor]:
    """Attach ``lm_head.weight`` (or check it equals the tied embedding) and refuse HF tensors with no place."""
    if "lm_head.weight" in sd:
        head = take("lm_head.weight")
        if tied:
            if not torch.equal(head, out["embedding.word_embeddings.weight"]):
                raise UnsupportedArchitecture(
                    f"tie_word_embeddings is true but lm_head.weight differs from {embedding_name}")
        else:
            out["output_layer.weight"] = head
    elif not tied:
        raise UnsupportedArchitecture("tie_word_embeddings is false but the weights have no lm_head.weight")
    unused = sorted(set(sd) - used)
    if unused:
        raise UnsupportedArchitecture(f"Hugging Face {family} tensors largelm has no place for: {unused[:6]}")
    return {k: v.contiguous() for k, v in out.items()}

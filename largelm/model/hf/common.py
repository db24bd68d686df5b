"""What every Hugging Face -> megatron GPT import shares: handing out tensors by name, the output head and a check
that nothing is left over."""

from __future__ import annotations

import torch

from largelm.errors import UnsupportedArchitecture


class Taker:
    """``take(name)``: the Hugging Face tensor ``name`` (refused when absent), remembered as used."""

    def __init__(self, sd: dict[str, torch.Tensor], family: str):
        self.sd, self.family, self.used = sd, family, set()

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.sd:
            raise UnsupportedArchitecture(f"Hugging Face {self.family} weights lack {name}")
        self.used.add(name)
        return self.sd[name]


def finish_import(out: dict, take: Taker, tied: bool, embedding_name: str) -> dict[str, torch.Tensor]:
    """Attach ``lm_head.weight`` (or check it equals the tied embedding) and refuse HF tensors with no place."""
    sd, used, family = take.sd, take.used, take.family
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

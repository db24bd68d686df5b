"""Text generation with a full (TP=1, single-stage) GPTModel: greedy or temperature/top-k sampling.

No KV cache: every new token re-runs the model on the last ``seq_length`` tokens (fine for evaluation-sized
outputs on small models; the context is cropped to the positions the model was trained on). Logits of padded
vocabulary entries (ids >= the tokenizer's vocabulary) are never sampled.
"""

from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def generate_ids(model: torch.nn.Module, ids: list[int], max_new_tokens: int, *, context: int, vocab_size: int,
                 temperature: float = 0.0, top_k: Optional[int] = None, eos_id: Optional[int] = None,
                 seed: int = 0) -> list[int]:
    """``ids`` + up to ``max_new_tokens`` generated ids (stops early at ``eos_id``). temperature 0 = greedy."""
    if not ids:
        raise ValueError("generation needs at least one prompt token")
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = list(ids)
    for _ in range(max_new_tokens):
        window = torch.tensor([out[-context:]], dtype=torch.long, device=device)
        pos = torch.arange(window.size(1), device=device).unsqueeze(0)
        logits = model(window, pos, None)[0, -1, :vocab_size].float().cpu()
        if temperature <= 0:
            nxt = int(torch.argmax(logits))
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        out.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return out


def generate(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32, *, context: int,
             temperature: float = 0.0, top_k: Optional[int] = None, seed: int = 0) -> str:
    """The prompt's continuation as text (``tokenizer``: largelm.tokenizer.Tokenizer; ``context`` = seq_length)."""
    eos = tokenizer.eos_id  # documents are separated by EOS in the shards: also the start of an empty prompt
    ids = tokenizer.encode(prompt) or [eos]
    out = generate_ids(model, ids, max_new_tokens, context=context, vocab_size=tokenizer.vocab_size,
                       temperature=temperature, top_k=top_k, eos_id=eos, seed=seed)
    return tokenizer.decode(out[len(ids):])

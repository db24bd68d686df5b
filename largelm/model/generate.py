"""Text generation with a single-stage GPTModel (TP=1, or every tensor-parallel rank running the same loop): greedy or
sampled (temperature, top-k, top-p), with a KV cache (megatron-core's ``StaticInferenceContext``) or without one.

With the cache (``use_cache=True``, the default) the prompts are run once (prefill) and every new token runs the
model on that one token: megatron's attention keeps each layer's keys/values in the context's buffers
(``key_value_memory_dict``, allocated on the first forward) and, past the prefill, attends the new query to all
cached keys (``AttnMaskType.no_mask``); rotary embeddings (llama style) are sliced at the cached offset by megatron
itself, learned positions (gpt2 style) come from the ``position_ids`` passed here. The loop (prefill, offsets,
decode mode) is the one megatron's static-batching text-generation controller runs; that controller and its engine
are not used because they are built around megatron's tokenizer/request objects and CUDA-side bookkeeping, and its
sampler refuses top-k together with top-p and temperature 0.

Without the cache (``use_cache=False``) every new token re-runs the model on the last ``context`` tokens. Both paths
crop to the ``context`` positions the model was trained on: once a sequence is longer, the window slides, positions
restart at 0 in it and every cached key would change, so the cached path falls back to recomputing the window
(the same computation as the uncached path) for the tokens past ``context``.

Batches: prompts of different lengths share one cache. The prefill covers the shortest prompt; a longer prompt's
remaining tokens are fed one per step like generated ones (forced, as megatron's static controller does), so every
row sees exactly the tokens and positions it would alone: no padding enters attention. Row ``i`` samples with its own
generator seeded ``seed + i`` (row 0 of a batch samples as the prompt alone). Logits of padded vocabulary entries
(ids >= the tokenizer's vocabulary) are never sampled.

Stopping: a row ends at ``eos_id``, after ``max_new_tokens``, or as soon as ``stop(row, generated ids)`` says so
(lm-eval's ``until`` strings: ``largelm.model.harness``); the batch ends when every row has.

``forward`` replaces the model by a callable ``tokens [b, s] -> logits [b, s, V]`` (positions 0..s-1), run without
a cache: a model whose forward is a collective over several ranks (in-training evaluation at TP/PP/ZeRO-3,
largelm/train/harness_eval.py).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from megatron.core import tensor_parallel
from megatron.core.inference.contexts import StaticInferenceContext

from largelm.parallel.cpu_compat import model_parallel_manual_seed


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """ValueError naming the bad setting (temperature < 0, top_k < 1, top_p outside (0, 1])."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def next_token_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                     top_p: Optional[float] = None) -> torch.Tensor:
    """The sampling distribution [..., V] (fp32) from ``logits`` [..., V] (``temperature`` > 0), in the order of
    Hugging Face's and megatron's samplers: divide by ``temperature``; keep the ``top_k`` largest logits (ties with
    the k-th kept); keep the smallest set of most likely tokens whose probability reaches ``top_p`` (a token is
    dropped when the tokens more likely than it already hold ``top_p``; the most likely token always stays);
    renormalise."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def pick_next(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
              generator: torch.Generator) -> int:
    """The next token id from one row of logits [V]: argmax when ``temperature`` is 0, else a draw from
    ``next_token_probs`` with ``generator`` (CPU, so that a seed gives the same tokens on any device)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = next_token_probs(logits.float().cpu(), temperature, top_k, top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _last_logits(model: torch.nn.Module, tokens: torch.Tensor, first_position: int,
                 inference_context: Optional[StaticInferenceContext] = None) -> torch.Tensor:
    """Logits [b, V_padded] after the last of ``tokens`` [b, s] placed at ``first_position``..."""
    positions = torch.arange(first_position, first_position + tokens.size(1), device=tokens.device)
    positions = positions.unsqueeze(0).expand_as(tokens)
    # runtime_gather_output: full-vocabulary logits on every tensor-parallel rank (megatron's inference forward
    # insists on it; a no-op at TP=1), so every rank picks the same token
    return model(tokens, positions, None, inference_context=inference_context, runtime_gather_output=True)[:, -1]


# tokens [b, s] -> logits [b, s, V] at positions 0..s-1 (a model run some other way, e.g. as a collective)
Forward = Callable[[torch.Tensor], torch.Tensor]
# (row, the row's generated ids so far) -> True: the row is finished (the last id is kept)
StopRule = Callable[[int, list[int]], bool]


@torch.no_grad()
def generate_batch(model: Optional[torch.nn.Module], prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                   context: int, vocab_size: int, temperature: float = 0.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None, eos_id: Optional[int] = None, seed: int = 0,
                   use_cache: bool = True, stop: Optional[StopRule] = None,
                   forward: Optional[Forward] = None) -> list[list[int]]:
    """Each prompt's ids + up to ``max_new_tokens`` generated ids (a row stops at ``eos_id``, included, or when
    ``stop`` says so). ``temperature`` 0 = greedy; ``context`` = the model's seq_length; ``forward``: run this
    instead of ``model``, without a cache (see the module docstring)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generation needs at least one prompt token per prompt")
    check_sampling(temperature, top_k, top_p)
    if forward is not None:
        use_cache, device = False, torch.device("cpu")
    else:
        model.eval()  # megatron uses the inference context only outside training mode
        if not tensor_parallel.get_cuda_rng_tracker().is_initialized():
            # megatron's attention (which runs the decode steps) forks the model-parallel RNG stream even without
            # dropout: seed the streams of a process that never did (a tool that only loads weights)
            model_parallel_manual_seed(seed)
        device = next(model.parameters()).device
    lens = [len(p) for p in prompts]
    batch = len(prompts)
    total = max(lens) + max_new_tokens
    tokens = torch.zeros(batch, total, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(list(p), dtype=torch.long)
    tokens = tokens.to(device)
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(batch)]
    generated = [0] * batch
    done = [max_new_tokens <= 0] * batch
    cache = StaticInferenceContext(batch, min(total, context)) if use_cache else None
    cached = 0  # leading columns whose keys/values are in the cache
    known = min(lens)  # leading columns known for every row
    while not all(done):
        if cache is not None and known <= context:
            if cached:
                cache.enable_decode_mode()  # one new token per row from here on
            logits = _last_logits(model, tokens[:, cached:known], cached, cache)
            cache.increment_sequence_len_offset(known - cached)
            cached = known
        else:  # no cache, or past the trained positions: the window of the last `context` tokens from position 0
            start = max(0, known - context)
            window = tokens[:, start:known]
            logits = forward(window)[:, -1] if forward is not None else _last_logits(model, window, 0)
        logits = logits[:, :vocab_size]
        for i in range(batch):
            if known < lens[i] or done[i]:
                continue  # still reading its prompt (the column holds the prompt token), or finished
            nxt = pick_next(logits[i], temperature, top_k, top_p, generators[i])
            tokens[i, known] = nxt
            generated[i] += 1
            done[i] = generated[i] >= max_new_tokens or (eos_id is not None and nxt == eos_id) or (
                stop is not None and stop(i, tokens[i, lens[i]:known + 1].tolist()))
        known += 1
    return [tokens[i, :lens[i] + generated[i]].tolist() for i in range(batch)]


@torch.no_grad()
def generate_ids(model: torch.nn.Module, ids: list[int], max_new_tokens: int, *, context: int, vocab_size: int,
                 temperature: float = 0.0, top_k: Optional[int] = None, eos_id: Optional[int] = None,
                 seed: int = 0, top_p: Optional[float] = None, use_cache: bool = True) -> list[int]:
    """``ids`` + up to ``max_new_tokens`` generated ids (stops early at ``eos_id``). temperature 0 = greedy."""
    if not ids:
        raise ValueError("generation needs at least one prompt token")
    return generate_batch(model, [ids], max_new_tokens, context=context, vocab_size=vocab_size,
                          temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, seed=seed,
                          use_cache=use_cache)[0]


def generate(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32, *, context: int,
             temperature: float = 0.0, top_k: Optional[int] = None, seed: int = 0, top_p: Optional[float] = None,
             use_cache: bool = True) -> str:
    """The prompt's continuation as text (``tokenizer``: largelm.tokenizer.Tokenizer; ``context`` = seq_length)."""
    eos = tokenizer.eos_id  # documents are separated by EOS in the shards: also the start of an empty prompt
    ids = tokenizer.encode(prompt) or [eos]
    out = generate_ids(model, ids, max_new_tokens, context=context, vocab_size=tokenizer.vocab_size,
                       temperature=temperature, top_k=top_k, eos_id=eos, seed=seed, top_p=top_p,
                       use_cache=use_cache)
    return tokenizer.decode(out[len(ids):])

"""KV-cache generation (largelm/model/generate.py) against the no-cache path, and the samplers.

The no-cache path re-runs the model on the whole prefix for every token (what generation did before the cache);
the cached path runs megatron-core's ``StaticInferenceContext``. Models: tiny gpt2- and llama-style (GQA, RoPE)
GPTs with large random weights (``randomize``), so logits are far from uniform and a wrong key/value/position shows.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.inference.contexts import StaticInferenceContext
from mp_utils import randomize
from tolerances import chain_length, sum_rtol

from largelm.config import ModelConfig, ParallelConfig
from largelm.model.generate import generate_batch, generate_ids, next_token_probs
from largelm.model.gpt import build_gpt_model
from largelm.parallel.cpu_compat import model_parallel_manual_seed
from largelm.quant import QuantFormat, quantize_model

VOCAB = 200
CONTEXT = 32
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=CONTEXT, vocab_size=VOCAB)
STYLES = {
    "gpt2": dict(style="gpt2", **TINY),
    "llama": dict(style="llama", num_query_groups=2, tie_embeddings=False, **TINY),  # GQA + RoPE
}
# different lengths, one of a single token; 9 + 30 new tokens runs past the 32 trained positions
PROMPTS = [[5, 6, 7, 8, 9], [17], [3, 4, 5, 6, 7, 8, 9, 10, 11], [42, 42, 42]]


def model_of(style: str, seed: int = 1) -> torch.nn.Module:
    model_parallel_manual_seed(seed)
    model = build_gpt_model(ModelConfig(**STYLES[style]), ParallelConfig(), vocab_size=VOCAB)
    return randomize(model, seed).eval()


def no_cache(model, prompt, new, **kw):
    return generate_ids(model, prompt, new, context=CONTEXT, vocab_size=VOCAB, use_cache=False, **kw)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_cached_logits_equal_full_forward(tp1, style):
    """Prefill 5 tokens, then decode one at a time: every step's logits are the full forward's at that position,
    within two fp32 evaluations of the same reduction chain (tests/tolerances.py)."""
    model = model_of(style)
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(20).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        full = model(tokens, positions, None)  # [b, s, V]
        ctx = StaticInferenceContext(3, 20)
        cached = [model(tokens[:, :5], positions[:, :5], None, inference_context=ctx, runtime_gather_output=True)]
        ctx.increment_sequence_len_offset(5)
        ctx.enable_decode_mode()
        for s in range(5, 20):
            cached.append(model(tokens[:, s:s + 1], positions[:, s:s + 1], None, inference_context=ctx,
                                runtime_gather_output=True))
            ctx.increment_sequence_len_offset(1)
    cached = torch.cat(cached, dim=1)  # [b, 16, V]: positions 4..19
    ref = full[:, 4:]
    tol = sum_rtol(chain_length(layers=2, hidden=64, ffn=256, seq=20, heads=4)) * ref.abs().max().item()
    assert (cached - ref).abs().max().item() <= tol
    assert ref.abs().max().item() > 1.0  # the random weights give logits that matter


@pytest.mark.parametrize("style", sorted(STYLES))
def test_cache_equals_no_cache_token_for_token(tp1, style):
    model = model_of(style)
    for prompt in PROMPTS:
        assert generate_ids(model, prompt, 30, context=CONTEXT, vocab_size=VOCAB) == no_cache(model, prompt, 30)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_batch_of_different_lengths_equals_each_prompt_alone(tp1, style):
    model = model_of(style)
    batch = generate_batch(model, PROMPTS, 30, context=CONTEXT, vocab_size=VOCAB)
    assert batch == [no_cache(model, p, 30) for p in PROMPTS]
    assert [len(b) for b in batch] == [len(p) + 30 for p in PROMPTS]


def test_eos_stops_a_row_and_only_that_row(tp1):
    model = model_of("gpt2")
    free = no_cache(model, PROMPTS[0], 12)
    eos = free[len(PROMPTS[0]) + 3]  # the 4th generated token
    first = free.index(eos, len(PROMPTS[0]))  # where it is first generated
    batch = generate_batch(model, PROMPTS[:2], 12, context=CONTEXT, vocab_size=VOCAB, eos_id=eos)
    assert batch[0] == free[:first + 1]
    assert batch[1] == no_cache(model, PROMPTS[1], 12, eos_id=eos)


def test_stop_rule_ends_a_row_as_soon_as_it_holds_and_only_that_row(tp1):
    """A row stops right after the token that makes ``stop`` true (kept), the others run on; every row is a prefix
    of its generation without the rule; the rule sees exactly the row's generated ids."""
    model = model_of("gpt2")
    free = [no_cache(model, p, 12) for p in PROMPTS[:3]]
    seen = []

    def stop(row: int, generated: list[int]) -> bool:
        seen.append((row, list(generated)))
        assert generated == free[row][len(PROMPTS[row]):len(PROMPTS[row]) + len(generated)]
        return row == 1 and len(generated) == 3  # row 1 is done after its 3rd token

    batch = generate_batch(model, PROMPTS[:3], 12, context=CONTEXT, vocab_size=VOCAB, stop=stop)
    assert batch[1] == free[1][:len(PROMPTS[1]) + 3]
    assert batch[0] == free[0] and batch[2] == free[2]
    assert max(len(g) for r, g in seen if r == 1) == 3  # never asked again after it stopped
    # every row stopping early ends the whole batch early: no forward past the last row's stop
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        early = generate_batch(model, PROMPTS[:2], 12, context=CONTEXT, vocab_size=VOCAB,
                               stop=lambda row, generated: len(generated) == 2)
    finally:
        hook.remove()
    assert early == [f[:len(p) + 2] for f, p in zip(free, PROMPTS[:2])]
    # prefill to the shortest prompt (1 token), then one forward per column until both rows have 2 new tokens
    assert len(calls) == max(len(p) for p in PROMPTS[:2]) + 2 - min(len(p) for p in PROMPTS[:2])


def test_quantized_model_cache_equals_no_cache(tp1):
    """int4 (QuantLinear in every transformer linear layer) generates through the same cache."""
    model = model_of("llama")
    quantize_model(model, QuantFormat(4, 32), "rtn")
    for prompt in PROMPTS[:2]:
        assert generate_ids(model, prompt, 20, context=CONTEXT, vocab_size=VOCAB) == no_cache(model, prompt, 20)


def test_sampling_is_reproducible_with_a_seed(tp1):
    model = model_of("llama")
    kw = dict(context=CONTEXT, vocab_size=VOCAB, temperature=1.0, top_p=0.9)
    a = generate_ids(model, PROMPTS[0], 20, seed=3, **kw)
    assert a == generate_ids(model, PROMPTS[0], 20, seed=3, **kw)
    assert a == no_cache(model, PROMPTS[0], 20, seed=3, temperature=1.0, top_p=0.9)
    assert a != generate_ids(model, PROMPTS[0], 20, seed=4, **kw)
    # row 0 of a batch samples as the prompt alone (row i: seed + i)
    assert generate_batch(model, PROMPTS[:2], 20, seed=3, **kw)[0] == a


def test_top_k_1_is_greedy(tp1):
    model = model_of("gpt2")
    greedy = generate_ids(model, PROMPTS[2], 20, context=CONTEXT, vocab_size=VOCAB)
    for seed in (0, 1):
        assert generate_ids(model, PROMPTS[2], 20, context=CONTEXT, vocab_size=VOCAB, temperature=5.0, top_k=1,
                            seed=seed) == greedy


def test_padded_vocabulary_is_never_sampled(tp1):
    model = model_of("gpt2")  # padded vocabulary: 256 rows for 200 tokens
    out = generate_ids(model, PROMPTS[0], 30, context=CONTEXT, vocab_size=VOCAB, temperature=50.0)
    assert max(out) < VOCAB


# --- the sampling distribution, on hand-built logits --------------------------------------------------------------

PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 2), 0.05 (id 0)


@pytest.mark.parametrize("top_p,kept", [(0.4, {1}), (0.75, {1, 3}), (0.9, {1, 3, 2}), (0.99, {0, 1, 2, 3}),
                                        (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = next_token_probs(PROBS.log(), 1.0, top_p=top_p)
    assert set(torch.nonzero(probs).flatten().tolist()) == kept
    expected = torch.where(torch.isin(torch.arange(4), torch.tensor(sorted(kept))), PROBS, 0.0)
    torch.testing.assert_close(probs, expected / expected.sum())


def test_top_k_and_temperature():
    logits = PROBS.log()
    probs = next_token_probs(logits, 1.0, top_k=2)
    torch.testing.assert_close(probs, torch.tensor([0.0, 0.5, 0.0, 0.3]) / 0.8)
    hot = next_token_probs(logits, 2.0)  # softmax(log p / 2) = sqrt(p), renormalised
    torch.testing.assert_close(hot, PROBS.sqrt() / PROBS.sqrt().sum())
    both = next_token_probs(logits, 1.0, top_k=3, top_p=0.7)  # top-k first: {1, 3, 2}; renormalised 0.53, 0.32
    assert set(torch.nonzero(both).flatten().tolist()) == {1, 3}


def test_top_p_draws_stay_in_the_nucleus():
    g = torch.Generator().manual_seed(0)
    probs = next_token_probs(PROBS.log().expand(4000, 4), 1.0, top_p=0.75)
    draws = torch.multinomial(probs, 1, generator=g).flatten()
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.8) < 0.03  # 4000 draws: std 0.008


def test_bad_settings_are_refused(tp1):
    model = model_of("gpt2")
    for kw, match in ((dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                      (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")):
        with pytest.raises(ValueError, match=match):
            generate_ids(model, [1], 2, context=CONTEXT, vocab_size=VOCAB, **kw)
    with pytest.raises(ValueError, match="at least one prompt token"):
        generate_batch(model, [[1], []], 2, context=CONTEXT, vocab_size=VOCAB)


def test_a_process_that_never_seeded_megatron_generates(tp1):
    """megatron's attention forks the model-parallel RNG stream in the decode steps: a tool that only loads weights
    (no model_parallel_manual_seed) must still generate, the same tokens as after seeding."""
    from megatron.core import tensor_parallel

    model = model_of("gpt2")
    seeded = generate_ids(model, PROMPTS[0], 6, context=CONTEXT, vocab_size=VOCAB)
    tensor_parallel.get_cuda_rng_tracker().reset()
    assert generate_ids(model, PROMPTS[0], 6, context=CONTEXT, vocab_size=VOCAB) == seeded

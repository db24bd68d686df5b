"""``largelm-generate``: text from a trained model, with a KV cache (largelm/model/generate.py).

    largelm-generate --checkpoint runs/gpt-tiny/checkpoints --prompt "To be, or not" --max-new-tokens 64 \
        --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1
    largelm-generate --checkpoint runs/gpt-tiny/checkpoints --interactive < prompts.txt

``--checkpoint``: a training checkpoint of any layout (root -> its latest, or a step directory), a consolidated or
Hugging Face directory (what ``largelm-convert`` reads), or a quantized checkpoint (``tools/quantize.py``). Each
prompt's text and continuation go to stdout; the speed (new tokens, seconds, tokens/s, cache or not) to stderr.
``--interactive`` reads prompts from stdin, one a line, until EOF. Temperature 0 (the default) is greedy; a seed
makes sampling reproducible (every prompt is sampled with the same seed). ``--nproc N`` generates on N
tensor-parallel ranks (spawned CPU processes, each holding 1/N of the weights; with ``--prompt``): every rank runs
the same loop on the gathered logits, rank 0's text is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from largelm.cli import exit_now, positive_int


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = _non_negative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="largelm-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint root, step directory, consolidated, "
                   "Hugging Face or quantized directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to continue ('' = from the start of a document)")
    what.add_argument("--interactive", action="store_true", help="read prompts from stdin, one a line, until EOF")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=_probability, default=None,
                   help="sample among the most likely tokens holding probability p (nucleus sampling)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="tensor-parallel ranks (spawned CPU processes; with --prompt; default 1)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix for every token (no KV cache)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="sentencepiece model (default: the one the checkpoint records)")
    return p


def _generate_one(loaded, prompt: str, args) -> tuple[str, int, float]:
    """(text, new tokens, seconds) for one prompt."""
    from largelm.model.generate import generate_ids  # lazy: torch/megatron, after the arguments are checked

    tok = loaded.tokenizer
    ids = tok.encode(prompt)
    start_ids = ids or [tok.eos_id]  # an empty prompt starts a document (documents are separated by EOS)
    started = time.perf_counter()
    out = generate_ids(loaded.module, start_ids, args.max_new_tokens, context=loaded.context,
                       vocab_size=tok.vocab_size, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       eos_id=tok.eos_id, seed=args.seed, use_cache=not args.no_cache)
    seconds = time.perf_counter() - started
    new = len(out) - len(start_ids)
    return tok.decode(ids + out[len(start_ids):]), new, seconds


def _report(text: str, new: int, seconds: float, cache: bool) -> None:
    print(text, flush=True)
    print(f"[{new} new tokens in {seconds:.3f} s: {new / seconds:.1f} tokens/s, "
          f"{'KV cache' if cache else 'no cache'}]", file=sys.stderr, flush=True)


def _tensor_parallel_rank(rank: int, world_size: int, args) -> tuple[str, int, float, str]:
    """One of ``--nproc`` spawned ranks (largelm.convert.spawn.run_ranks): its TP shard, the same generation loop."""
    from largelm.generation.load import load_causal_lm  # lazy (a spawned process)
    from largelm.parallel import groups  # lazy (a spawned process)
    from largelm.parallel.cpu_compat import model_parallel_manual_seed  # lazy (a spawned process)

    groups.init_distributed("gloo")
    try:
        groups.init_model_parallel(world_size, 1)
        model_parallel_manual_seed(args.seed)
        loaded = load_causal_lm(args.checkpoint, _dtype(args), args.tokenizer, tensor_parallel=world_size)
        return (*_generate_one(loaded, args.prompt, args), _describe(loaded) + f", {world_size} tensor-parallel ranks")
    finally:
        groups.destroy()


def _dtype(args):
    import torch  # lazy (usage errors first)

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]


def _describe(loaded) -> str:
    return f"loaded {loaded.describe} ({loaded.model.style} style, {loaded.model.num_layers} layers, " \
        f"context {loaded.context})"


def run(args) -> None:
    if args.nproc > 1:
        from largelm.convert.spawn import run_ranks  # lazy (usage errors first)

        text, new, seconds, describe = run_ranks(_tensor_parallel_rank, args.nproc, args)[0]
        print(describe, file=sys.stderr, flush=True)
        _report(text, new, seconds, cache=not args.no_cache)
        return
    # stdout carries only the generated text: what libraries print while loading (DeepSpeed's op builder reports
    # on stdout) goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        from largelm.generation.load import load_causal_lm  # lazy (usage errors first)
        from largelm.quant import single_process_parallel_state  # lazy (usage errors first)
    with contextlib.ExitStack() as world:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's comm backend reports its build on stdout
            world.enter_context(single_process_parallel_state(args.seed))
            loaded = load_causal_lm(args.checkpoint, _dtype(args), args.tokenizer)
        print(_describe(loaded), file=sys.stderr, flush=True)
        prompts = (line.rstrip("\n") for line in sys.stdin) if args.interactive else [args.prompt]
        for prompt in prompts:
            _report(*_generate_one(loaded, prompt, args), cache=not args.no_cache)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nproc > 1 and args.interactive:
        parser.error("--nproc > 1 generates for one --prompt (the spawned ranks read no stdin)")
    from largelm.checkpoint.manager import CheckpointError  # lazy: after the arguments are checked
    from largelm.config import ConfigError  # lazy (usage errors first)
    from largelm.errors import ConversionError  # lazy (usage errors first)
    from largelm.generation.load import ModelLoadError  # lazy (usage errors first)
    from largelm.quant import QuantizationError  # lazy (usage errors first)
    from largelm.tokenizer import TokenizerError  # lazy (usage errors first)

    try:
        run(args)
    except (ModelLoadError, ConversionError, CheckpointError, ConfigError, QuantizationError,
            TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    exit_now(main())  # output flushed, process group destroyed: skip the interpreter's teardown of torch

"""KV-cache generation vs recomputing the prefix: tokens/s for 256 new tokens (largelm/model/generate.py).

    python bench/generate_kvcache.py [--new-tokens 256] [--reps 3] [--cases gpt-tiny/gpt2,gpt-tiny/llama,gpt-25m/gpt2]

Models (``model/style``): the quickstart shape (gpt-tiny: 4 layers, h=128, 4 heads) and the gpt-25m shape of the
other benchmarks (8 layers, h=512, 8 heads), gpt2 style or llama style (RMSNorm, SwiGLU, RoPE, GQA with half as many
key/value heads), with 512 positions (room for the prompt and 256 new tokens), random weights (speed does not depend
on training), fp32, the default tokenizer's vocabulary. One prompt (a 16-token line), greedy, batch 1. Arms, timed
interleaved in one process after a short warm-up (8 tokens each) (bench/common.py):

* ``kv cache``: prefill once, then one token per forward (megatron-core's StaticInferenceContext);
* ``no cache``: every new token re-runs the model on the whole prefix (what largelm generated with before).

Both arms must produce the same tokens (checked and recorded). Writes bench/results/generate_kvcache.{json,md,png}.
"""

from __future__ import annotations

import argparse

from common import device, init_single_rank, interleaved, seed_all
from report import (
    DATA,
    finish_metadata,
    fmt_num,
    fmt_spread,
    md_table,
    plt,
    run_metadata,
    save_plot,
    stats,
    write_result,
)

NAME = "generate_kvcache"
POSITIONS = 512
SHAPES = {"gpt-tiny": dict(num_layers=4, hidden_size=128, num_attention_heads=4),
          "gpt-25m": dict(num_layers=8, hidden_size=512, num_attention_heads=8)}
STYLE_FIELDS = {"gpt2": {}, "llama": {"tie_embeddings": False}}
PROMPT = "To be, or not to be, that is the question: Whether 'tis nobler in the mind"


def tokenizer_and_prompt(length: int = 16):
    from largelm.tokenizer import Tokenizer

    path = DATA / "tokenizer" / "spm.model"
    if not path.is_file():  # no prepared data: a fixed prompt in an 8000-token vocabulary
        return 8000, list(range(1, length + 1)), "fixed ids 1..16 (no tokenizer at data/default)"
    tok = Tokenizer.load(path)
    return tok.vocab_size, tok.encode(PROMPT)[:length], repr(tok.decode(tok.encode(PROMPT)[:length]))


def run_case(case: str, vocab: int, prompt: list[int], new_tokens: int, reps: int) -> dict:
    from largelm.config import ModelConfig, ParallelConfig
    from largelm.model.generate import generate_ids
    from largelm.model.gpt import build_gpt_model

    shape_name, style = case.split("/")
    shape = SHAPES[shape_name]
    seed_all(0)
    kv_heads = {"num_query_groups": shape["num_attention_heads"] // 2} if style == "llama" else {}
    model_cfg = ModelConfig(style=style, vocab_size=vocab, seq_length=POSITIONS, **shape, **STYLE_FIELDS[style],
                            **kv_heads)
    model = build_gpt_model(model_cfg, ParallelConfig(), vocab_size=vocab).to(device()).eval()
    outputs = {}

    def arm(name: str, use_cache: bool, tokens: int = new_tokens):
        def run():
            outputs[name] = generate_ids(model, prompt, tokens, context=model_cfg.seq_length, vocab_size=vocab,
                                         use_cache=use_cache)
        return run

    arm("kv cache", True, 8)()  # warm-up: a short generation each (a full no-cache one takes minutes on a CPU)
    arm("no cache", False, 8)()
    times = interleaved({"kv cache": arm("kv cache", True), "no cache": arm("no cache", False)}, reps=reps,
                        steps_per_rep=1, warmup=0, label=case)
    tps = {name: stats([new_tokens / t for t in ts]) for name, ts in times.items()}
    speedup = stats([b / a for a, b in zip(times["kv cache"], times["no cache"])])
    params = sum(p.numel() for p in model.parameters())
    return {"case": case, "model": shape_name, "style": style, "shape": shape, "params": params,
            "prompt_tokens": len(prompt), "new_tokens": new_tokens,
            "tokens_per_s": tps, "speedup": speedup, "seconds": {k: stats(v) for k, v in times.items()},
            "same_tokens": outputs["kv cache"] == outputs["no cache"]}


def plot(results: list[dict]) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 3.4))
    for i, arm in enumerate(("no cache", "kv cache")):
        med = [r["tokens_per_s"][arm]["median"] for r in results]
        xs = [x + (i - 0.5) * 0.38 for x in range(len(results))]
        ax.bar(xs, med, 0.38, label=arm)
    for x, r in enumerate(results):
        ax.annotate(f"x{r['speedup']['median']:.1f}", (x, r["tokens_per_s"]["kv cache"]["median"]), xytext=(0, 4),
                    textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(range(len(results)), [f"{r['case']}\n{r['params'] / 1e6:.1f}M" for r in results])
    ax.set_yscale("log")
    ax.margins(y=0.15)
    save_plot(fig, NAME, ax, ylabel="new tokens/s (median)",
              title=f"greedy generation of {results[0]['new_tokens']} tokens, batch 1")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per arm")
    p.add_argument("--cases", default="gpt-tiny/gpt2,gpt-tiny/llama,gpt-25m/gpt2",
                   help=f"comma-separated model/style; models {', '.join(SHAPES)}, styles {', '.join(STYLE_FIELDS)}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = p.parse_args(argv)
    init_single_rank(args.threads)
    meta = run_metadata(config={"shapes": SHAPES, "positions": POSITIONS, "dtype": "fp32", "batch": 1,
                                "greedy": True})
    vocab, prompt, prompt_text = tokenizer_and_prompt()
    meta["prompt"] = prompt_text
    results = [run_case(c, vocab, prompt, args.new_tokens, args.reps) for c in args.cases.split(",")]
    finish_metadata(meta)
    rows = [[f"{r['case']} ({r['params'] / 1e6:.1f}M params)", fmt_spread(r["tokens_per_s"]["no cache"]),
             fmt_spread(r["tokens_per_s"]["kv cache"]), f"x{fmt_num(r['speedup']['median'])}",
             "yes" if r["same_tokens"] else "**no**"] for r in results]
    md = "\n\n".join([
        f"# KV-cache generation: {args.new_tokens} new tokens",
        f"Greedy generation of {args.new_tokens} tokens after a {len(prompt)}-token prompt, batch 1, fp32, "
        f"{POSITIONS} positions, random weights; gpt-tiny = the quickstart shape (4 layers, hidden 128), gpt-25m = "
        "8 layers, hidden 512 (llama style: RMSNorm, SwiGLU, RoPE, half as many key/value heads). "
        "`no cache` re-runs the model on the whole prefix for each token; `kv cache` runs the prompt once "
        "and then one token per forward (megatron-core `StaticInferenceContext`). Arms timed interleaved in one "
        "process; tokens/s as median [IQR] (min-max) over the repetitions; speed-up = per-repetition ratio of the "
        "times, median.",
        md_table(["model", "no cache tokens/s", "kv cache tokens/s", "speed-up", "same tokens"], rows),
    ])
    busy = max(meta["load_avg_1min_at_start"], meta.get("load_avg_1min_at_end", 0)) > (meta["cores"] or 1) + 1
    notes = ("- the machine was shared (load average above its core count): absolute tokens/s are low and noisy; "
             "the speed-ups are per-repetition ratios of back-to-back runs" if busy else "")
    write_result(NAME, {"meta": meta, "results": results}, md, plot="tokens/s with and without the KV cache",
                 meta=meta, run_notes=notes)
    plot(results)


if __name__ == "__main__":
    main()

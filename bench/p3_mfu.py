"""P3 - MFU: achieved model FLOP/s of largelm training / measured matmul peak, fp32 and bf16, ~25M-param GPT.

Model FLOPs per token (``largelm.model.flops.flops_per_token``, the PaLM/Megatron convention):

    6 * N  +  12 * L * h * s

N = parameters that take part in a matmul (every linear layer plus the output projection, counted once even
when tied to the embedding; embedding lookups, norms and biases excluded), L layers, hidden size h, sequence
length s; 6 = 2 FLOPs per multiply-add x (forward + 2 backward matmuls); 12 L h s = attention scores and
weighted sum (2 matmuls x 2 s h FLOPs per token per layer forward, x3 with backward), causal mask not
discounted, recompute not counted.

Achieved FLOP/s = tokens/s of largelm's training step (``DenseStep``, 1 process, all cores) x FLOPs/token.
Peak = the trainer's definition (``Trainer`` without ``logging.peak_tflops_per_rank``): the best achieved rate of
the model's own matrix products - every linear of ``largelm.model.flops.matmul_shapes`` at this micro-batch
(QKV, attention output, MLP in and out, logits), each in the three layouts training runs (forward ``x @ w.T``,
input gradient ``g @ w``, weight gradient ``g.T @ x``), timed by ``largelm.train.metrics.matmul_flops`` - in the
same dtype with the same threads, measured in the same run, interleaved with the training repetitions (so both
see the same machine state). Not one square matmul: on an AVX2 CPU bf16 ran at 0.8 GFLOP/s as a square
n=1024 product and 1-31 GFLOP/s across the model's products, so a square peak gave MFU above 100%.
``--square-sizes`` adds square n x n matmuls as a reference column. MFU = achieved / peak; target >= 40%.
bf16 is skipped, with the reason recorded, where it is not native and not cheap (``common.bf16_skip_reason``).

    python bench/p3_mfu.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import time

from common import (
    MODEL_SHAPES,
    SMALL,
    config_summary,
    init_single_rank,
    model_matmul_rates,
    record_skips,
    shipped_precision,
    skip_reason,
    square_matmul_flops,
    sync,
)
from report import (
    finish_metadata,
    fmt_num,
    fmt_spread,
    md_table,
    plt,
    run_metadata,
    save_plot,
    stats,
    verdict,
    write_result,
)

TARGET = 0.40
NAME = "p3_mfu"


def run_case(model: str, precision: str, mb: int, ga: int, reps: int, steps: int, peak_seconds: float,
             square_sizes: tuple, datasheet_peak: float | None) -> dict:
    import arms
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cfg, _, step = arms.largelm_case(model, precision, mb, ga)
    summary = config_summary(cfg)
    step()  # warm-up
    tokens_per_step = summary["tokens_per_step_per_rank"]
    step_times, rates, squares = [], [], {n: [] for n in square_sizes}
    for r in range(reps):
        rates.append(model_matmul_rates(cfg, dtype, peak_seconds))  # the model's products, training's layouts
        for n in square_sizes:
            squares[n].append(square_matmul_flops(dtype, n, peak_seconds))
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        step_times.append((time.perf_counter() - t0) / steps)
        best_key = max(rates[-1], key=rates[-1].get)
        print(f"[P3 {model} {precision}] rep {r + 1}/{reps}: step {step_times[-1] * 1e3:.0f} ms, peak "
              f"{rates[-1][best_key] / 1e9:.0f} GFLOP/s ({best_key})"
              + "".join(f", square n={n} {squares[n][-1] / 1e9:.0f} GFLOP/s" for n in square_sizes), flush=True)
    achieved = [tokens_per_step * summary["flops_per_token"] / t for t in step_times]
    peaks = [max(rr.values()) for rr in rates]  # per repetition: the best product at that moment
    product_rates = {key: stats([rr[key] for rr in rates]) for key in rates[0]}
    best_product = max(product_rates, key=lambda k: product_rates[k]["median"])
    # MFU per repetition against that repetition's peak (same moment), summarised
    mfu = stats([a / p for a, p in zip(achieved, peaks)])
    if datasheet_peak:  # GPU: MFU against the vendor's dense peak (the usual definition there)
        mfu = stats([a / datasheet_peak for a in achieved])
    del step
    gc.collect()
    return {"model": model, "precision": precision, "config": summary, "datasheet_peak_flops": datasheet_peak,
            "step_time_s": stats(step_times), "tokens_per_s": stats([tokens_per_step / t for t in step_times]),
            "achieved_flops": stats(achieved),
            "peak_definition": "per repetition, the best rate of the model's matrix products (matmul_shapes at "
                               "this micro-batch, forward/input-grad/weight-grad layouts; train.metrics.matmul_flops)",
            "peak_flops": stats(peaks), "peak_product": best_product, "product_rates": product_rates,
            "square_flops_by_size": {str(n): stats(v) for n, v in squares.items()}, "mfu": mfu}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMALL, choices=list(MODEL_SHAPES))
    p.add_argument("--precisions", default="fp32,bf16", help="fp32, bf16, auto (what train.precision: auto picks "
                   "here); bf16 is skipped where not native and not cheap (LARGELM_BENCH_EMULATED_BF16=run: time it)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--steps-per-rep", type=int, default=1)
    p.add_argument("--peak-seconds", type=float, default=None,
                   help="seconds timed per matrix product for the peak (default 0.1; --quick 0.05)")
    p.add_argument("--square-sizes", default="",
                   help="also time n x n matmuls of these sizes, as a reference column (e.g. 1024,2048; not the peak)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="datasheet dense peak per GPU for the MFU denominator, e.g. 989 (H100 SXM bf16); fp32 runs "
                        "use it too, so pass it with a single precision")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    init_single_rank(args.threads)
    meta = run_metadata()
    reps = 2 if args.quick else args.reps
    peak_seconds = args.peak_seconds or (0.05 if args.quick else 0.1)
    sizes = tuple(int(n) for n in args.square_sizes.split(",") if n)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    precisions = []
    for requested in args.precisions.split(","):
        prec = shipped_precision()[0] if requested == "auto" else requested
        if prec not in precisions:
            precisions.append(prec)
    results, skipped = [], []
    for prec in precisions:
        reason = skip_reason(prec, args.model)
        if reason:
            print(f"[P3 {args.model} {prec}] skipped: {reason}", flush=True)
            skipped.append({"case": f"{args.model} {prec}", "model": args.model, "precision": prec, "reason": reason})
            continue
        results.append(run_case(args.model, prec, args.micro_batch, 1, reps, args.steps_per_rep, peak_seconds, sizes,
                                peak))
    record_skips(meta, skipped)
    if not results:
        raise SystemExit("P3: no precision runs on this machine: " + "; ".join(s["reason"] for s in skipped))
    meta["config"] = results[0]["config"]
    finish_metadata(meta)
    data = {"meta": meta, "target": TARGET, "target_text": "MFU >= 40% (bf16 and fp32)",
            "headline": {"value": min(r["mfu"]["median"] for r in results),
                         "case": "min over " + ", ".join(r["precision"] for r in results)},
            "formula": "flops/token = 6*N + 12*L*h*s (N = matmul params incl. output projection once); peak = best "
                       "rate of the model's own matrix products in training's layouts (as the trainer)",
            "cases": results}
    c = results[0]["config"]
    engines = ", ".join(f"{r['precision']} ZeRO-{r['config']['engine_zero_stage']}" for r in results)
    m = c["model"]
    rows, product_rows = [], []
    for r in results:
        rows.append([r["precision"], fmt_spread(r["tokens_per_s"]), fmt_spread(r["achieved_flops"], 1e-9),
                     f"{fmt_spread(r['peak_flops'], 1e-9)} ({r['peak_product']})",
                     ", ".join(f"n={n}: {fmt_num(s['median'] / 1e9)}" for n, s in r["square_flops_by_size"].items())
                     or "-", fmt_spread(r["mfu"], 100), verdict(r["mfu"]["median"], TARGET, higher_is_better=True)])
    for key in results[0]["product_rates"]:  # the same products in every precision
        product_rows.append([f"`{key}`", *(fmt_num(r["product_rates"][key]["median"] / 1e9) for r in results)])
    md = f"""# P3: model FLOPs utilisation, {args.model} (1 process, all cores)

Model: GPT-2 style, L={m['num_layers']}, h={m['hidden_size']}, heads={m['heads']}, ffn={m['ffn']}, s={m['seq_length']},
vocab={m['vocab']} (tied); N = {c['matmul_params']:,} matmul parameters; micro-batch {c['micro_batch_size']} x
{c['grad_accum_steps']} ({c['tokens_per_step_per_rank']} tokens/step); largelm `DenseStep`, ZeRO-{c['zero_stage']}
(one replica, the engine runs: {engines}).

**FLOPs/token = 6 N + 12 L h s = {c['flops_per_token']:,}** (6 N: forward + backward of every matmul weight;
12 L h s: attention scores and weighted sum, causal mask not discounted; no recompute).
Peak (as the trainer's MFU): the best rate of the model's own matrix products - every linear at this micro-batch
({c['micro_batch_size']} x {m['seq_length']} tokens) in the forward, input-gradient and weight-gradient layouts -
in the same dtype and threads, measured in the same run before each training repetition ({peak_seconds} s per
product). MFU per repetition = achieved / that repetition's peak{
'' if not peak else f' (here: / the datasheet peak {args.peak_tflops} TFLOP/s given with --peak-tflops)'}.
Median [IQR] (min-max). Target: MFU >= {TARGET:.0%}.

{md_table(["precision", "tokens/s", "achieved GFLOP/s", "peak GFLOP/s (best product)",
           "square n x n GFLOP/s (reference)", "MFU %", "target"], rows)}

Rates of the model's matrix products (median over repetitions; `product m x k x n`: `[m, k]` inputs, `[n, k]`
weight):

{md_table(["product m x k x n", *(f"{r['precision']} GFLOP/s" for r in results)], product_rows)}
"""
    write_result(NAME, data, md, plot="P3", meta=meta)
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5.5, 3.6))
    x = range(len(results))
    ax.bar([i - 0.2 for i in x], [r["peak_flops"]["median"] / 1e9 for r in results], 0.4,
           label="peak (best model product)")
    ax.bar([i + 0.2 for i in x], [r["achieved_flops"]["median"] / 1e9 for r in results], 0.4,
           label="largelm achieved (model FLOPs)")
    for i, r in zip(x, results):
        ax.annotate(f"MFU {r['mfu']['median']:.0%}", (i + 0.2, r["achieved_flops"]["median"] / 1e9), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(list(x), [r["precision"] for r in results])
    save_plot(fig, NAME, ax, ylabel="GFLOP/s", title=f"P3: MFU, {args.model} (target {TARGET:.0%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

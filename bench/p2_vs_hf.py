"""P2 - against what users use today: tokens/s of largelm vs Hugging Face transformers, CPU, same tokens.

HF arm: ``GPT2LMHeadModel`` configured with largelm's shape (exact-erf GeLU, no dropout, tied embeddings, the
padded vocabulary), the largelm model's initial weights copied in, trained by a plain loop (torch AdamW,
clip_grad_norm_, same LR schedule; bf16 = fp32 weights under ``torch.autocast(bfloat16)``, which is what
``Trainer(bf16=True)`` does on CPU, minus the Trainer's own overhead). All arms consume the same micro-batches in
the same order, interleaved in one process; a figure is the per-repetition tokens/s ratio largelm / HF.
Target: >= 1.3.

Two comparisons:

* like for like - both in the case's precision. Each case also measures this machine's matmul peak in that
  precision, to state the *ceiling*: peak / HF's achieved model FLOP/s is the most any implementation doing the
  same FLOPs could gain over HF (with fp32 on CPU HF already runs near the peak, so that ceiling is below 1.3);
* default recipes (bf16 cases) - largelm as it ships (every configs/*.yaml trains in bf16 with fp32 master
  weights) vs HF as a user runs it without extra flags (``Trainer`` and the plain loop default to fp32): the same
  tokens through the same model, each framework's default precision.

    python bench/p2_vs_hf.py [--quick]
"""

from __future__ import annotations

import gc

from common import SMALL, TINY, Cycle, default_peak_sizes, measured_peak, run_case_benchmark
from report import fmt_spread, grouped_bar_plot, md_table, ratio_stats, verdict, write_result

TARGET = 1.3
NAME = "p2_vs_hf"
HF = "HF transformers"
HF_DEFAULT = "HF transformers fp32 (default)"


def run_case(model: str, precision: str, mb: int, ga: int, reps: int, steps: int, zero_stage: int = 2) -> dict:
    import torch

    import arms

    cfg, tokens, largelm = arms.largelm_case(model, precision, mb, ga, zero_stage)
    state = largelm.initial_state_dict()
    steppers = [largelm, arms.HFStep(cfg, Cycle(tokens), state)]
    if precision != "fp32":
        steppers.append(arms.HFStep(cfg, Cycle(tokens), state, precision="fp32", name=HF_DEFAULT))
    out, _ = arms.compare_arms(cfg, steppers, model=model, reps=reps, steps=steps, label=f"P2 {model} {precision}",
                               hf_attn_implementation=steppers[1].attn_implementation)
    tps = out["tokens_per_s"]  # stats keep each repetition's value, in order: the ratio pairs repetitions
    out["speedup_largelm_vs_hf"] = ratio_stats(tps["largelm"]["values"], tps[HF]["values"])
    if HF_DEFAULT in tps:
        out["speedup_largelm_vs_hf_default"] = ratio_stats(tps["largelm"]["values"], tps[HF_DEFAULT]["values"])
    peak = measured_peak(torch.bfloat16 if precision == "bf16" else torch.float32, default_peak_sizes(), 0.6)
    flops = out["config"]["flops_per_token"]
    out["peak_flops"] = peak
    out["fraction_of_peak"] = {arm: s["median"] * flops / peak for arm, s in tps.items()}
    out["ceiling_vs_hf"] = peak / (tps[HF]["median"] * flops)
    del largelm, steppers
    gc.collect()
    return out


def main(argv=None) -> int:
    meta, results = run_case_benchmark(argv, __doc__, run_case, models=f"{TINY},{SMALL}")
    worst = min(results, key=lambda r: r["speedup_largelm_vs_hf"]["median"])
    data = {"meta": meta, "target": TARGET, "target_text": "largelm tokens/s / HF tokens/s >= 1.3",
            "headline": {"value": worst["speedup_largelm_vs_hf"]["median"],
                         "case": f"worst like-for-like case: {worst['model']} {worst['precision']}"},
            "cases": results}
    rows, recipe_rows = [], []
    for r in results:
        sp, tps, frac = r["speedup_largelm_vs_hf"], r["tokens_per_s"], r["fraction_of_peak"]
        rows.append([f"{r['model']} {r['precision']}", r["config"]["tokens_per_step_per_rank"],
                     f"{r['reps']} x {r['steps_per_rep']}", fmt_spread(tps["largelm"]), fmt_spread(tps[HF]),
                     fmt_spread(sp), verdict(sp["median"], TARGET, higher_is_better=True),
                     f"{frac['largelm']:.0%} / {frac[HF]:.0%}", f"{r['ceiling_vs_hf']:.2f}"])
        if "speedup_largelm_vs_hf_default" in r:
            sd = r["speedup_largelm_vs_hf_default"]
            recipe_rows.append([r["model"], f"{fmt_spread(tps['largelm'])} ({r['precision']})",
                                fmt_spread(tps[HF_DEFAULT]), fmt_spread(sd),
                                verdict(sd["median"], TARGET, higher_is_better=True)])
    loss_rows = [[f"{r['model']} {r['precision']}", r["hf_attn_implementation"],
                  ", ".join(f"{k} {v:.5f}" for k, v in r["first_step_loss"].items())] for r in results]
    md = f"""# P2: largelm vs Hugging Face transformers (CPU, 1 process)

Tokens/s of largelm's training step vs `GPT2LMHeadModel` (same shape and initial weights) in a plain PyTorch
loop, same micro-batches and threads; median [IQR] (min-max) over interleaved repetitions, each timing "steps"
optimizer steps. Target: largelm / HF >= {TARGET}.

## Like for like (same precision)

"share of peak": model FLOP/s (6 N + 12 L h s per token, as P3) / this machine's matmul peak in that precision,
measured in the same run (largelm / HF). "ceiling": peak / HF's model FLOP/s - the largest speed-up over HF that
*any* implementation doing the same FLOPs could reach here.

{md_table(["case", "tokens/step", "reps x steps", "largelm tokens/s", "HF tokens/s", "largelm / HF", "target",
           "share of peak", "ceiling"], rows)}

## Default recipes (what each user runs without extra flags)

largelm trains in bf16 with fp32 master weights in every shipped config; HF's `Trainer` and a plain loop train in
fp32 unless told otherwise. Same tokens, same model, same weights, in the same interleaved run as the bf16 rows
above.

{md_table(["model", "largelm tokens/s", "HF tokens/s (fp32)", "largelm / HF", "target"], recipe_rows)}

{md_table(["case", "HF attention", "step-1 loss per arm (same weights and batch)"], loss_rows)}
"""
    write_result(NAME, data, md, plot="P2", meta=meta)
    grouped_bar_plot(NAME, results, ["largelm", HF, HF_DEFAULT], lambda r, arm: r["tokens_per_s"].get(arm),
                     lambda r: r["speedup_largelm_vs_hf"]["median"], ylabel="tokens/s (median, IQR)",
                     title=f"P2: largelm vs HF GPT-2 (label: same precision; target x{TARGET})",
                     figsize=(7, 3.8), margin=0.12)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

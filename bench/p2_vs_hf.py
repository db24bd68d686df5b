"""P2 - against what users use today: tokens/s of largelm vs Hugging Face transformers, CPU, same tokens.

HF arm: ``GPT2LMHeadModel`` configured with largelm's shape (exact-erf GeLU, no dropout, tied embeddings, the
padded vocabulary), the largelm model's initial weights copied in, trained by a plain loop (torch AdamW,
clip_grad_norm_, same LR schedule; bf16 = fp32 weights under ``torch.autocast(bfloat16)``, which is what
``Trainer(bf16=True)`` does on CPU, minus the Trainer's own overhead). All arms consume the same micro-batches in
the same order, interleaved in one process; a figure is the per-repetition tokens/s ratio largelm / HF.
Target: >= 1.3.

Two comparisons:

* as users run each (the headline) - largelm as it ships (``train.precision: auto``, every shipped config's
  setting: bf16 with fp32 master weights where the device computes bf16 natively, fp32 elsewhere; resolved here by
  ``largelm.hardware.choose_precision``) vs HF as a user runs it without extra flags (``Trainer`` and the plain
  loop default to fp32). On a machine without native bf16 that is fp32 vs fp32, the fp32 like-for-like arms; with
  native bf16 it is largelm bf16 vs an extra HF fp32 arm in the bf16 case. Each row says the precisions used;
* like for like - both in the case's precision. Each case also measures this machine's peak in that precision
  (the best rate of the model's own matrix products in training's layouts, as the trainer's MFU: P3), to state
  the *ceiling*: peak / HF's achieved model FLOP/s is the most any implementation doing the same FLOPs could gain
  over HF (with fp32 on CPU HF already runs near the peak, so that ceiling is below 1.3). bf16 cases are skipped,
  with the reason recorded, where bf16 is not native and the model's products are more than 3x slower in bf16
  (an AVX2-only CPU: 30-85x; ``common.bf16_skip_reason``).

    python bench/p2_vs_hf.py [--quick]
"""

from __future__ import annotations

import gc

from common import SMALL, TINY, Cycle, model_peak, run_case_benchmark, shipped_precision
from report import fmt_num, fmt_spread, grouped_bar_plot, md_table, ratio_stats, verdict, write_result

TARGET = 1.3
NAME = "p2_vs_hf"
HF = "HF transformers"
HF_DEFAULT = "HF transformers fp32 (default)"


def as_users_run_label(r: dict) -> str:
    """Which precision each arm of the "as users run each" comparison used on this machine."""
    a = r["as_users_run"]
    return f"largelm as shipped (auto = {a['largelm_precision']} here) vs HF {a['hf_precision']} (its default)"


def run_case(model: str, precision: str, mb: int, ga: int, reps: int, steps: int, zero_stage: int = 2) -> dict:
    import arms
    import torch

    shipped, why = shipped_precision()
    cfg, tokens, largelm = arms.largelm_case(model, precision, mb, ga, zero_stage)
    state = largelm.initial_state_dict()
    steppers = [largelm, arms.HFStep(cfg, Cycle(tokens), state)]
    as_shipped = precision == shipped  # this case's largelm arm is largelm as it ships here
    if as_shipped and precision != "fp32":  # HF as users run it: fp32 (with fp32 shipped the HF arm already is)
        steppers.append(arms.HFStep(cfg, Cycle(tokens), state, precision="fp32", name=HF_DEFAULT))
    out, _ = arms.compare_arms(cfg, steppers, model=model, reps=reps, steps=steps, label=f"P2 {model} {precision}",
                               hf_attn_implementation=steppers[1].attn_implementation)
    tps = out["tokens_per_s"]  # stats keep each repetition's value, in order: the ratio pairs repetitions
    out["speedup_largelm_vs_hf"] = ratio_stats(tps["largelm"]["values"], tps[HF]["values"])
    if as_shipped:
        hf_arm = HF_DEFAULT if HF_DEFAULT in tps else HF
        out["as_users_run"] = {"largelm_precision": precision, "largelm_precision_reason": why,
                               "hf_precision": "fp32", "hf_arm": hf_arm,
                               "speedup": ratio_stats(tps["largelm"]["values"], tps[hf_arm]["values"])}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak, rates = model_peak(cfg, dtype, seconds_per_product=0.1, reps=3)
    flops = out["config"]["flops_per_token"]
    out["peak_flops"] = peak
    out["peak_rates"] = rates
    out["peak_definition"] = ("best median rate of the model's matrix products (largelm.model.flops.matmul_shapes) "
                              "in training's three layouts, largelm.train.metrics.matmul_flops")
    out["fraction_of_peak"] = {arm: s["median"] * flops / peak for arm, s in tps.items()}
    out["ceiling_vs_hf"] = peak / (tps[HF]["median"] * flops)
    del largelm, steppers
    gc.collect()
    return out


def main(argv=None) -> int:
    meta, results = run_case_benchmark(argv, __doc__, run_case, models=f"{TINY},{SMALL}", label="P2")
    shipped, why = shipped_precision()
    worst = min(results, key=lambda r: r["speedup_largelm_vs_hf"]["median"])
    shipped_cases = [r for r in results if "as_users_run" in r]
    if shipped_cases:
        worst_shipped = min(shipped_cases, key=lambda r: r["as_users_run"]["speedup"]["median"])
        headline = {"value": worst_shipped["as_users_run"]["speedup"]["median"],
                    "case": f"worst as-users-run case: {worst_shipped['model']}, {as_users_run_label(worst_shipped)}"}
    else:
        headline = {"value": worst["speedup_largelm_vs_hf"]["median"],
                    "case": f"worst like-for-like case: {worst['model']} {worst['precision']} (the shipped "
                            f"precision, {shipped}, was not among --precisions)"}
    data = {"meta": meta, "target": TARGET, "target_text": "largelm tokens/s / HF tokens/s >= 1.3",
            "shipped_precision": shipped, "shipped_precision_reason": why, "headline": headline,
            "worst_like_for_like": {"value": worst["speedup_largelm_vs_hf"]["median"],
                                    "case": f"{worst['model']} {worst['precision']}"},
            "cases": results}
    rows, recipe_rows = [], []
    for r in results:
        sp, tps, frac = r["speedup_largelm_vs_hf"], r["tokens_per_s"], r["fraction_of_peak"]
        rows.append([f"{r['model']} {r['precision']}", r["config"]["tokens_per_step_per_rank"],
                     f"{r['reps']} x {r['steps_per_rep']}", fmt_spread(tps["largelm"]), fmt_spread(tps[HF]),
                     fmt_spread(sp), verdict(sp["median"], TARGET, higher_is_better=True),
                     f"{frac['largelm']:.0%} / {frac[HF]:.0%}", f"{fmt_num(r['peak_flops'] / 1e9)}",
                     f"{r['ceiling_vs_hf']:.2f}"])
        if "as_users_run" in r:
            a = r["as_users_run"]
            recipe_rows.append([r["model"], f"{fmt_spread(tps['largelm'])} ({a['largelm_precision']})",
                                f"{fmt_spread(tps[a['hf_arm']])} ({a['hf_precision']})", fmt_spread(a["speedup"]),
                                verdict(a["speedup"]["median"], TARGET, higher_is_better=True)])
    skipped = "".join(f"\n\nNot run here: {s['case']} - {s['reason']}." for s in meta.get("skipped", []))
    if shipped == "fp32":
        recipe_text = ("This machine has no native bf16, so largelm as shipped trains in fp32 here: this is fp32 vs "
                       "fp32, the same arms and figures as the fp32 like-for-like rows below.")
    else:
        recipe_text = ("This machine computes bf16 natively, so largelm as shipped trains in bf16 (fp32 master "
                       "weights) here, against an extra HF arm in fp32 run in the same interleaved bf16 case.")
    loss_rows = [[f"{r['model']} {r['precision']}", r["hf_attn_implementation"],
                  ", ".join(f"{k} {v:.5f}" for k, v in r["first_step_loss"].items())] for r in results]
    md = f"""# P2: largelm vs Hugging Face transformers (CPU, 1 process)

Tokens/s of largelm's training step vs `GPT2LMHeadModel` (same shape and initial weights) in a plain PyTorch
loop, same micro-batches and threads; median [IQR] (min-max) over interleaved repetitions, each timing "steps"
optimizer steps. Target: largelm / HF >= {TARGET}.

## As users run each (headline)

largelm as it ships: every shipped config has `train.precision: auto`, which on this machine is **{shipped}**;
HF's `Trainer` and a plain loop train in **fp32** unless told otherwise. {recipe_text}
(largelm.hardware: {why}.)

{md_table(["model", "largelm tokens/s (precision)", "HF tokens/s (precision)", "largelm / HF", "target"],
          recipe_rows) if recipe_rows else "(not measured: the shipped precision was not among --precisions)"}

## Like for like (same precision)

"share of peak": model FLOP/s (6 N + 12 L h s per token, as P3) / this machine's peak in that precision, measured
in the same run as P3 and the trainer measure it: the best rate of the model's own matrix products (every linear
at this micro-batch, in the forward, input-gradient and weight-gradient layouts) (largelm / HF). "ceiling": peak /
HF's model FLOP/s - the largest speed-up over HF that *any* implementation doing the same FLOPs could reach
here.{skipped}

{md_table(["case", "tokens/step", "reps x steps", "largelm tokens/s", "HF tokens/s", "largelm / HF", "target",
           "share of peak", "peak GFLOP/s", "ceiling"], rows)}

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

"""P2 - against what users use today: tokens/s of largelm vs Hugging Face transformers, CPU, same tokens.

HF arm: ``GPT2LMHeadModel`` configured with largelm's shape (exact-erf GeLU, no dropout, tied embeddings, the
padded vocabulary), the largelm model's initial weights copied in, trained by a plain loop (torch AdamW,
clip_grad_norm_, same LR schedule; bf16 = fp32 weights under ``torch.autocast(bfloat16)``, which is what
``Trainer(bf16=True)`` does on CPU, minus the Trainer's own overhead). Both arms consume the same micro-batches in
the same order, interleaved in one process; the figure is the per-repetition tokens/s ratio largelm / HF.
Target: >= 1.3.

    python bench/p2_vs_hf.py [--quick]
"""

from __future__ import annotations

import argparse
import gc

from common import (SMALL, TINY, Cycle, add_case_args, fmt_spread, grouped_bar_plot, md_table, ratio_stats,
                    run_cases, verdict, write_result)

TARGET = 1.3
NAME = "p2_vs_hf"


def run_case(model: str, precision: str, mb: int, ga: int, reps: int, steps: int, zero_stage: int = 2) -> dict:
    import arms

    cfg, tokens, largelm = arms.largelm_case(model, precision, mb, ga, zero_stage)
    hf = arms.HFStep(cfg, Cycle(tokens), largelm.initial_state_dict())
    out, _ = arms.compare_arms(cfg, [largelm, hf], model=model, reps=reps, steps=steps, label=f"P2 {model} {precision}",
                               hf_attn_implementation=hf.attn_implementation)
    tps = out["tokens_per_s"]  # stats keep each repetition's value, in order: the ratio pairs repetitions
    out["speedup_largelm_vs_hf"] = ratio_stats(tps["largelm"]["values"], tps["HF transformers"]["values"])
    del largelm, hf
    gc.collect()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_args(p, models=f"{TINY},{SMALL}")
    meta, results = run_cases(p.parse_args(argv), run_case)
    worst = min(results, key=lambda r: r["speedup_largelm_vs_hf"]["median"])
    data = {"meta": meta, "target": TARGET, "target_text": "largelm tokens/s / HF tokens/s >= 1.3",
            "headline": {"value": worst["speedup_largelm_vs_hf"]["median"],
                         "case": f"worst case: {worst['model']} {worst['precision']}"},
            "cases": results}
    rows = []
    for r in results:
        sp = r["speedup_largelm_vs_hf"]
        rows.append([f"{r['model']} {r['precision']}", r["config"]["tokens_per_step_per_rank"],
                     f"{r['reps']} x {r['steps_per_rep']}",
                     fmt_spread(r["tokens_per_s"]["largelm"]), fmt_spread(r["tokens_per_s"]["HF transformers"]),
                     fmt_spread(sp), verdict(sp["median"], TARGET, higher_is_better=True)])
    loss_rows = [[f"{r['model']} {r['precision']}", r["hf_attn_implementation"],
                  ", ".join(f"{k} {v:.5f}" for k, v in r["first_step_loss"].items())] for r in results]
    md = f"""# P2: largelm vs Hugging Face transformers (CPU, 1 process)

Tokens/s of largelm's training step vs `GPT2LMHeadModel` (same shape and initial weights) in a plain PyTorch
loop, same micro-batches, precision and threads; median [IQR] (min-max) over interleaved repetitions, each
timing "steps" optimizer steps.
Target: largelm / HF >= {TARGET}.

{md_table(["case", "tokens/step", "reps x steps", "largelm tokens/s", "HF tokens/s", "largelm / HF", "target"], rows)}

{md_table(["case", "HF attention", "step-1 loss per arm (same weights and batch)"], loss_rows)}
"""
    write_result(NAME, data, md, plot="P2", meta=meta)
    grouped_bar_plot(NAME, results, ["largelm", "HF transformers"], lambda r, arm: r["tokens_per_s"][arm],
                     lambda r: r["speedup_largelm_vs_hf"]["median"], ylabel="tokens/s (median, IQR)",
                     title=f"P2: largelm vs HF GPT2LMHeadModel (label: speed-up; target x{TARGET})",
                     figsize=(6.5, 3.6), margin=0.12)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

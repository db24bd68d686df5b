"""P1 - framework overhead: largelm's training step vs a bare PyTorch loop, 1 process.

Same weights (the largelm model's initial weights copied into the plain model), same micro-batches in the same
order, same precision, same threads, same optimizer settings (AdamW, clipping, LR schedule). Arms run
interleaved in one process; the figure is the per-repetition ratio largelm / plain PyTorch step time (median,
IQR, min-max). Target: <= 1.05. Cases in fp32 and bf16 (the overhead per dtype); bf16 cases are skipped, with
the reason recorded, where bf16 is not native and not cheap (``common.bf16_skip_reason``).

A third, diagnostic arm runs largelm's megatron-core model in the bare loop (no DeepSpeed), splitting the
overhead into "megatron-core model vs plain model" and "DeepSpeed engine vs bare loop".

    python bench/p1_overhead.py                  # what run_all.sh runs
    python bench/p1_overhead.py --quick          # a short smoke run
"""

from __future__ import annotations

import gc

from common import SMALL, TINY, Cycle, run_case_benchmark
from report import fmt_spread, grouped_bar_plot, md_table, ratio_stats, verdict, write_result

TARGET = 1.05
NAME = "p1_overhead"


def run_case(model: str, precision: str, mb: int, ga: int, reps: int, steps: int, zero_stage: int = 2) -> dict:
    import arms

    cfg, tokens, largelm = arms.largelm_case(model, precision, mb, ga, zero_stage)
    sd = largelm.initial_state_dict()
    plain = arms.ReferenceStep(cfg, Cycle(tokens), sd)
    # The diagnostic arm needs fp32: megatron's linear layers are custom autograd functions whose CPU backward
    # does not follow torch.autocast (custom_fwd is declared for device_type="cuda"), so bf16 autocast fails.
    mega = arms.MegatronPlainStep(cfg, Cycle(tokens), sd) if precision == "fp32" else None
    steppers = [a for a in (largelm, plain, mega) if a is not None]
    out, times = arms.compare_arms(cfg, steppers, model=model, reps=reps, steps=steps, label=f"P1 {model} {precision}",
                                   optimizer_class=type(largelm.engine.optimizer).__name__)
    out["ratio_largelm_vs_plain"] = ratio_stats(times["largelm"], times["plain PyTorch"])
    if mega is not None:
        out["ratio_largelm_vs_megatron_plain"] = ratio_stats(times["largelm"], times["megatron+AdamW"])
        out["ratio_megatron_plain_vs_plain"] = ratio_stats(times["megatron+AdamW"], times["plain PyTorch"])
    del largelm, plain, mega
    gc.collect()
    return out


def main(argv=None) -> int:
    meta, results = run_case_benchmark(argv, __doc__, run_case, models=f"{TINY},{SMALL}", label="P1")
    headline = results[0]["ratio_largelm_vs_plain"]["median"]
    data = {"meta": meta, "target": TARGET, "target_text": "largelm / plain PyTorch step time <= 1.05",
            "headline": {"value": headline, "case": f"{results[0]['model']} {results[0]['precision']}"},
            "cases": results}
    rows = []
    for r in results:
        st = r["step_time_s"]
        ratio = r["ratio_largelm_vs_plain"]
        rows.append([f"{r['model']} {r['precision']}", r["config"]["tokens_per_step_per_rank"],
                     f"{r['reps']} x {r['steps_per_rep']}",
                     fmt_spread(st["largelm"], 1e3), fmt_spread(st["plain PyTorch"], 1e3),
                     fmt_spread(st["megatron+AdamW"], 1e3) if "megatron+AdamW" in st else "n/a (fp32 only)",
                     fmt_spread(ratio), verdict(ratio["median"], TARGET, higher_is_better=False),
                     f"{fmt_spread(r['ratio_megatron_plain_vs_plain'])} / "
                     f"{fmt_spread(r['ratio_largelm_vs_megatron_plain'])}" if "megatron+AdamW" in st else "n/a"])
    loss_rows = [[f"{r['model']} {r['precision']}", r["optimizer_class"],
                  ", ".join(f"{k} {v:.5f}" for k, v in r["first_step_loss"].items())] for r in results]
    md = f"""# P1: framework overhead (1 process)

largelm's training step (`DenseStep`: megatron-core GPTModel in the DeepSpeed engine) vs a bare PyTorch loop
(tests/reference_gpt.py's plain GPT, torch.optim.AdamW, clip_grad_norm_, same LR schedule) with the same
initial weights, the same micro-batches, precision and threads. bf16: largelm = bf16 weights + fp32 master
weights/grad accumulation in DeepSpeed; plain = fp32 weights under `torch.autocast(bfloat16)`.
Step times in ms: median [IQR] (min-max) over interleaved repetitions, each timing "steps" optimizer steps.
Target: largelm / plain <= {TARGET}.

{md_table(["case", "tokens/step", "reps x steps", "largelm ms", "plain PyTorch ms", "megatron+AdamW ms (diagnostic)",
           "largelm / plain", "target", "split: megatron model / plain model, DeepSpeed / bare loop"], rows)}

First-step losses (same weights and batch, so equal up to rounding):

{md_table(["case", "DeepSpeed optimizer", "step-1 loss per arm"], loss_rows)}
"""
    write_result(NAME, data, md, plot="P1", meta=meta)
    grouped_bar_plot(NAME, results, ["largelm", "plain PyTorch", "megatron+AdamW"],
                     lambda r, arm: ({k: r["step_time_s"][arm][k] * 1e3 for k in ("median", "q1", "q3")}
                                     if arm in r["step_time_s"] else None),
                     lambda r: r["ratio_largelm_vs_plain"]["median"], ylabel="ms per optimizer step (median, IQR)",
                     title=f"P1: step time, largelm vs bare PyTorch (label: largelm/plain, target x{TARGET})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

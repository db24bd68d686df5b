"""Does distillation help? A tiny teacher, then the same small student trained the same steps with and without it.

    python bench/distill_vs_baseline.py [--teacher-steps 300] [--student-steps 150] [--nproc 1]

1. Teacher: configs/gpt-tiny.yaml (4 layers, h=128) trained ``--teacher-steps`` on data/default.
2. Student (2 layers, h=128), same data, seeds, schedule and steps, three arms through the real launcher:
   * ``baseline``: LM loss only, random init;
   * ``distill``: alpha * T^2 * KL(teacher || student) + (1 - alpha) * LM, random init (the same init as baseline);
   * ``distill+every_kth``: as ``distill`` but initialised from teacher layers 0 and 2 (``student_init``).
3. Validation loss / perplexity of each at the end (``eval_steps`` batches of data/default/shards/valid).

Writes bench/results/distill.md and bench/results/distill.json. Uses LARGELM_BENCH_DATA like the other benchmarks.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import yaml
from common import distill_bench_args, distill_bench_metadata, launch_training, shipped_precision
from report import DATA, REPO, finish_metadata, md_table, write_result

VALID = re.compile(r"^step (\d+) valid loss ([0-9.]+) ppl ([0-9.]+)", re.MULTILINE)


def config(work: Path, name: str, steps: int, layers: int, eval_steps: int, distill: dict | None = None) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "gpt-tiny.yaml").read_text())
    cfg["name"] = name
    cfg["model"]["num_layers"] = layers
    cfg["tokenizer"]["model"] = str(DATA / "tokenizer" / "spm.model")
    cfg["data"]["train"] = [{"path": str(DATA / "shards" / "train")}]
    cfg["data"]["valid"] = [{"path": str(DATA / "shards" / "valid")}]
    cfg["optimizer"]["warmup_steps"] = min(30, steps // 10)
    cfg["train"].update(steps=steps, eval_interval=steps, eval_steps=eval_steps, log_interval=max(1, steps // 10),
                        precision="auto", seed=1234)  # as shipped: bf16 where native, else fp32
    cfg["checkpoint"] = {"dir": str(work / name / "checkpoints"), "save_interval": 0, "keep_last": 1,
                         "resume": False}
    cfg["logging"] = {"tensorboard_dir": str(work / name / "tensorboard"), "progress_bar": False}
    if distill:
        cfg["distill"] = distill
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(cfg: Path, nproc: int, log: Path) -> dict:
    out, seconds = launch_training(cfg, nproc, log)
    step, loss, ppl = VALID.findall(out)[-1]
    return {"valid_loss": float(loss), "valid_ppl": float(ppl), "step": int(step), "seconds": seconds,
            "log": str(log)}


def write_results(args, meta: dict, results: dict) -> str:
    """``results/distill.{json,md}``: the arms finished so far, with the run record."""
    base = results.get("baseline", {}).get("valid_loss")
    rows = [[name, f"{r['valid_loss']:.4f}", f"{r['valid_ppl']:.2f}",
             "" if base is None else f"{r['valid_loss'] - base:+.4f}", f"{r['seconds']:.0f}"]
            for name, r in results.items()]
    verdict = ("(run incomplete)" if base is None or "distill" not in results
               else f"**{results['distill']['valid_loss'] < base}**")
    md = "\n".join([
        "# Distillation vs. the same student without a teacher", "",
        f"Teacher: gpt-tiny (4 layers, h=128) trained {args.teacher_steps} steps. Student: {args.student_layers} "
        f"layers, h=128, {args.student_steps} steps, same data order, seeds and LR schedule in every arm; "
        f"alpha={args.alpha}, T={args.temperature}; `precision: auto` (= {shipped_precision()[0]} on this machine); "
        f"{args.nproc} rank(s); validation loss over "
        f"{args.eval_steps} batches of {os.path.relpath(DATA / 'shards' / 'valid', REPO)}. Reproduce: "
        f"`python bench/distill_vs_baseline.py --teacher-steps {args.teacher_steps} "
        f"--student-steps {args.student_steps}`.", "",
        md_table(["run", "valid loss", "valid ppl", "vs baseline", "wall s"], rows), "",
        f"Distilled student (random init, same init as the baseline) beats the baseline: {verdict}",
    ])
    finish_metadata(meta)
    write_result("distill", {"meta": meta, "results": results}, md, meta=meta)
    return md


def main(argv=None) -> int:
    args, work = distill_bench_args(
        argv, __doc__, teacher_steps=300, student_steps=150, eval_steps=16, work_name="bench-distill",
        add_args=lambda p: p.add_argument("--student-layers", type=int, default=2))

    meta = distill_bench_metadata(args, student_layers=args.student_layers)
    teacher_ckpt = work / "teacher" / "checkpoints"
    results = {"teacher": run(config(work, "teacher", args.teacher_steps, 4, args.eval_steps), args.nproc,
                              work / "teacher.log")}
    distill = {"teacher": str(teacher_ckpt), "alpha": args.alpha, "temperature": args.temperature}
    arms = {
        "baseline": None,
        "distill": {**distill, "student_init": "random"},
        "distill+every_kth": {**distill, "student_init": "every_kth_layer", "k": 2},
    }
    for name, section in arms.items():
        slug = name.replace("+", "-")
        results[name] = run(config(work, slug, args.student_steps, args.student_layers, args.eval_steps, section),
                            args.nproc, work / f"{slug}.log")
        print(name, results[name], flush=True)
        print(write_results(args, meta, results))  # after every arm: a partial table survives an interruption
    return 0


if __name__ == "__main__":
    sys.exit(main())

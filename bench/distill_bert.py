"""Does BERT distillation help? A tiny BERT teacher, then the same small BERT student trained the same steps with and
without it (DistilBERT / TinyBERT style, largelm/train/distill_bert.py).

    python bench/distill_bert.py [--teacher-steps 150] [--student-steps 100] [--nproc 1]

1. Data: BERT sentence-pair (SOP) shards of data/default's corpus (tools/prepare_bert_data.py, seq 128; written
   under ``--work`` once). Uses LARGELM_BENCH_DATA like the other benchmarks.
2. Teacher: configs/bert-tiny.yaml (4 layers, h=128, MLM + SOP) trained ``--teacher-steps``.
3. Student (2 layers, h=128), same data order, seeds, LR schedule and steps, three arms through the real launcher:
   * ``baseline``: MLM + SOP loss only, random init;
   * ``distill``: alpha * T^2 * KL on the masked positions + (1 - alpha) * (MLM + SOP), the same random init;
   * ``distill+every_kth+hidden``: as ``distill``, initialised from teacher layers 0 and 2 (``student_init``), plus
     hidden-state cosine and attention-map alignment (student layer i <-> teacher layer 2i + 1).
4. Validation MLM loss (``valid/mlm_loss``, the masked positions of ``eval_steps`` batches of the valid split) every
   ``student_steps / 5`` steps; the verdict compares the last one.

Writes bench/results/distill_bert.{json,md,png}.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from common import distill_bench_args, distill_bench_metadata, launch_training, shipped_precision
from report import DATA, REPO, finish_metadata, md_table, plt, save_plot, write_result

NAME = "distill_bert"


def prepare_data(work: Path) -> Path:
    out = work / "bert_shards"
    if not (out / "valid").is_dir():
        subprocess.run([sys.executable, str(REPO / "tools" / "prepare_bert_data.py"), "--input",
                        str(DATA / "corpus" / "corpus.jsonl"), "--tokenizer", str(DATA / "tokenizer" / "spm.model"),
                        "--out", str(out), "--seq-length", "128", "--valid-fraction", "0.05", "--overwrite"],
                       cwd=REPO, check=True)
    return out


def config(work: Path, shards: Path, name: str, steps: int, layers: int, args, distill: dict | None = None) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "bert-tiny.yaml").read_text())
    cfg["name"] = name
    cfg["model"]["num_layers"] = layers
    cfg["tokenizer"]["model"] = str(DATA / "tokenizer" / "spm.model")
    cfg["data"]["train"] = [{"path": str(shards / "train")}]
    cfg["data"]["valid"] = [{"path": str(shards / "valid")}]
    cfg["optimizer"]["warmup_steps"] = min(30, steps // 10)
    cfg["train"].update(steps=steps, eval_interval=max(1, steps // 5), eval_steps=args.eval_steps,
                        micro_batch_size=args.micro_batch_size,
                        log_interval=max(1, steps // 10), precision="auto", seed=1234)  # as shipped
    cfg["checkpoint"] = {"dir": str(work / name / "checkpoints"), "save_interval": 0, "keep_last": 1,
                         "resume": False}
    cfg["logging"] = {"tensorboard_dir": str(work / name / "tensorboard"), "progress_bar": False}
    if distill:
        cfg["distill"] = distill
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def valid_curve(tensorboard: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("valid/mlm_loss")}


def run(cfg: Path, nproc: int, log: Path) -> dict:
    _, seconds = launch_training(cfg, nproc, log)
    curve = valid_curve(Path(yaml.safe_load(cfg.read_text())["logging"]["tensorboard_dir"]))
    last = max(curve)
    return {"valid_mlm_loss": curve[last], "step": last, "curve": curve, "seconds": seconds, "log": str(log)}


def plot(results: dict) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.4, 3.6))
    for name, r in results.items():
        if name != "teacher":
            steps = sorted(r["curve"])
            ax.plot(steps, [r["curve"][s] for s in steps], marker="o", label=name)
    if "teacher" in results:
        ax.axhline(results["teacher"]["valid_mlm_loss"], color="gray", linestyle="--", label="teacher (final)")
    ax.set_xlabel("student step")
    save_plot(fig, NAME, ax, ylabel="validation MLM loss", title="BERT student: with and without a teacher")


def write_results(args, meta: dict, results: dict) -> str:
    base = results.get("baseline", {}).get("valid_mlm_loss")
    rows = [[name, f"{r['valid_mlm_loss']:.4f}", "" if base is None else f"{r['valid_mlm_loss'] - base:+.4f}",
             f"{r['seconds']:.0f}"] for name, r in results.items()]
    distilled = [n for n in results if n.startswith("distill")]
    verdict = ("(run incomplete)" if base is None or not distilled else
               "; ".join(f"{n}: **{results[n]['valid_mlm_loss'] < base}**" for n in distilled))
    md = "\n".join([
        "# BERT distillation vs. the same student without a teacher", "",
        f"Teacher: bert-tiny (4 layers, h=128, MLM + SOP) trained {args.teacher_steps} steps. Student: 2 layers, "
        f"h=128, {args.student_steps} steps of {args.micro_batch_size} pairs x 128 tokens, same data order, seeds "
        f"and LR schedule in every arm; alpha={args.alpha}, "
        f"T={args.temperature}; KL on the masked positions; `precision: auto` (= {shipped_precision()[0]} on this "
        f"machine); {args.nproc} rank(s); validation MLM loss over {args.eval_steps} batches of the valid split of "
        "BERT shards built from data/default's corpus. Reproduce: "
        f"`python bench/distill_bert.py --teacher-steps {args.teacher_steps} --student-steps {args.student_steps}`.",
        "",
        md_table(["run", "valid MLM loss (last)", "vs baseline", "wall s"], rows), "",
        f"Distilled student beats the no-teacher baseline at equal steps: {verdict}",
    ])
    finish_metadata(meta)
    if len(results) > 1:
        plot(results)
    write_result(NAME, {"meta": meta, "results": results}, md, plot="validation MLM loss per arm", meta=meta)
    return md


def main(argv=None) -> int:
    args, work = distill_bench_args(
        argv, __doc__, teacher_steps=150, student_steps=100, eval_steps=8, work_name="bench-distill-bert",
        add_args=lambda p: p.add_argument("--micro-batch-size", type=int, default=8))

    meta = distill_bench_metadata(args, student_layers=2, micro_batch_size=args.micro_batch_size)
    shards = prepare_data(work)
    results = {"teacher": run(config(work, shards, "teacher", args.teacher_steps, 4, args), args.nproc,
                              work / "teacher.log")}
    distill = {"teacher": str(work / "teacher" / "checkpoints"), "alpha": args.alpha,
               "temperature": args.temperature}
    arms = {
        "baseline": None,
        "distill": {**distill, "student_init": "random"},
        "distill+every_kth+hidden": {**distill, "student_init": "every_kth_layer", "k": 2, "hidden_weight": 1.0,
                                     "attention_weight": 1.0},
    }
    for name, section in arms.items():
        slug = name.replace("+", "-")
        results[name] = run(config(work, shards, slug, args.student_steps, 2, args, section), args.nproc,
                            work / f"{slug}.log")
        print(name, {k: v for k, v in results[name].items() if k != "curve"}, flush=True)
        print(write_results(args, meta, results))  # after every arm: a partial table survives an interruption
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""P5 - memory: per-rank bytes of parameters + gradients + optimizer state for ZeRO 0/1/2/3 at DP=2.

Two ranks started by the real DeepSpeed launcher (``python -m deepspeed.launcher.runner --num_gpus 2``, gloo,
DS_ACCELERATOR=cpu). In each rank, for every ZeRO stage, largelm's engine (``DenseStep``: megatron-core
GPTModel in DeepSpeed, in the precision largelm ships - ``train.precision: auto``, bf16 where the machine computes
it natively, fp32 elsewhere - by default) runs one optimizer step (so Adam's state exists) and a second step up
to the end of the last micro-batch's backward - the point where gradients are complete and the optimizer has
not yet consumed them, i.e. where parameters, gradients and optimizer state are all alive. There
``largelm.train.state_bytes.training_state_bytes(engine)`` reads the sizes of the tensors the engine really
holds (each storage once; nothing computed from the model shape). After the step it is read again.

Ideal 1/DP partitioning (the ZeRO paper's accounting for this configuration; Psi = parameter count, N = DP):
parameters s_p*Psi and gradients s_g*Psi at the engine's model and gradient-accumulation dtypes (bf16: 2 bytes;
largelm accumulates bf16 gradients in fp32 under ZeRO >= 1, DeepSpeed's ZeRO-0 bf16 path in bf16), optimizer
state (4 bytes fp32 master copy when training in bf16, 0 in fp32) + 8 bytes Adam moments per parameter;
ZeRO-1 divides the optimizer state by N, ZeRO-2 also the gradients, ZeRO-3 also the parameters.
Target: ZeRO-3 measured <= 1.1 x ideal.

    python bench/p5_memory.py [--precision auto|bf16|fp32] [--model gpt-25m]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import SMALL, bench_config, config_summary, free_port, shipped_precision, skip_reason
from common import _cuda as cuda
from report import BENCH, finish_metadata, fmt_num, md_table, plt, run_metadata, save_plot, verdict, write_result

TARGET = 1.1
NAME = "p5_memory"
STAGES = (0, 1, 2, 3)
MiB = 2**20


def ideal_bytes(psi: int, stage: int, dp: int, s_p: int, s_g: int) -> dict:
    """Ideal per-rank bytes: ``s_p``/``s_g`` bytes per parameter/gradient element (the engine's model and
    gradient-accumulation dtypes), fp32 master copy when the model is not fp32, 8 bytes of Adam moments."""
    s_o = (4 if s_p != 4 else 0) + 8
    return {"params": psi * s_p / (dp if stage >= 3 else 1), "grads": psi * s_g / (dp if stage >= 2 else 1),
            "optimizer": psi * s_o / (dp if stage >= 1 else 1)}


# --- worker (one per rank, started by the deepspeed launcher) ---------------------------------------------------


def worker(args) -> None:
    import torch
    from common import Cycle, real_batches, seed_all

    from largelm.model.gpt import gpt_forward_loss
    from largelm.parallel import groups
    from largelm.train.state_bytes import training_state_bytes
    from largelm.train.step import DenseStep

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    groups.init_distributed()  # gloo on CPU, nccl on GPU
    groups.init_model_parallel(1, 1)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out = []
    for stage in STAGES:
        cfg = bench_config(args.model, precision=args.precision, zero_stage=stage, micro_batch_size=2,
                           grad_accum_steps=2)
        batches = Cycle(real_batches(cfg, 4, seed=cfg.data.seed + rank))
        seed_all(cfg.train.seed)
        step = DenseStep(cfg, world)
        engine = step.engine
        psi = sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in engine.module.parameters()}.values())
        step.train_step(batches)  # step 1: creates Adam's state
        engine.train()
        for micro in range(cfg.train.grad_accum_steps):  # step 2, stopped before the optimizer step
            _, loss = gpt_forward_loss(engine, next(batches)["tokens"])
            engine.backward(loss)
            if micro == cfg.train.grad_accum_steps - 1:
                before = training_state_bytes(engine, detail=True)
            engine.step()
        after = training_state_bytes(engine, detail=True)
        model_dtype, grad_dtype = engine.get_data_types()
        out.append({"stage": stage, "rank": rank, "world_size": world, "psi": psi,
                    "param_elem_bytes": torch.empty(0, dtype=model_dtype).element_size(),
                    "grad_elem_bytes": torch.empty(0, dtype=grad_dtype).element_size(),
                    "optimizer_class": type(engine.optimizer).__name__, "config": config_summary(cfg, world),
                    "before_step": before, "after_step": after})
        del step, engine
        gc.collect()
        torch.distributed.barrier()
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))
    groups.destroy()


# --- driver ----------------------------------------------------------------------------------------------------


def launch(args, out_dir: str) -> None:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.dp),
           "--master_port", str(free_port()), str(BENCH / "p5_memory.py"), "--worker", "--out", out_dir,
           "--model", args.model, "--precision", args.precision]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not cuda():  # what largelm-launch gives each rank
        from largelm.launch import cpu_environment

        env.pop("OMP_NUM_THREADS", None)
        env = cpu_environment(env, args.dp)
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=args.timeout)
    if proc.returncode != 0:
        print(proc.stdout[-8000:])
        raise SystemExit(f"P5 workers failed (exit {proc.returncode})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMALL)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto (default): what train.precision: auto picks on this machine, as shipped")
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--quick", action="store_true", help="accepted for run_all.sh; P5 is short already")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    requested = args.precision
    if args.precision == "auto":  # resolved here, so the workers, the label and the ideal agree
        args.precision = shipped_precision()[0]
        print(f"[P5] precision auto = {args.precision} on this machine", flush=True)
    else:
        reason = skip_reason(args.precision, args.model)
        if reason:
            raise SystemExit(f"P5: not run in {args.precision}: {reason}; use --precision auto or fp32 "
                             "(LARGELM_BENCH_EMULATED_BF16=run to run it anyway)")
    meta = run_metadata()
    meta["precision"] = {"requested": requested, "computed": args.precision}
    with tempfile.TemporaryDirectory() as tmp:
        launch(args, tmp)
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.dp)]
    meta["ranks"] = args.dp
    meta["threads_per_rank"] = max(1, (os.cpu_count() or 1) // args.dp)
    meta["launcher"] = (f"python -m deepspeed.launcher.runner --num_gpus {args.dp}"
                        + (" (nccl)" if cuda() else " (gloo, DS_ACCELERATOR=cpu)"))
    finish_metadata(meta)
    stages = []
    for i, stage in enumerate(STAGES):
        ranks = [per_rank[r][i] for r in range(args.dp)]
        psi = ranks[0]["psi"]
        ideal = ideal_bytes(psi, stage, args.dp, ranks[0]["param_elem_bytes"], ranks[0]["grad_elem_bytes"])
        worst = max(ranks, key=lambda x: x["before_step"]["total"])
        measured = worst["before_step"]
        cats = ("params", "grads", "optimizer", "other")
        stages.append({
            "stage": stage, "psi": psi, "optimizer_class": ranks[0]["optimizer_class"],
            "param_elem_bytes": ranks[0]["param_elem_bytes"], "grad_elem_bytes": ranks[0]["grad_elem_bytes"],
            "per_rank_total_before_step": [x["before_step"]["total"] for x in ranks],
            "per_rank_total_after_step": [x["after_step"]["total"] for x in ranks],
            "measured": {c: measured[c] for c in (*cats, "total")}, "measured_rank": worst["rank"],
            "after_step": {c: worst["after_step"][c] for c in (*cats, "total")},
            "ideal": {**ideal, "total": sum(ideal.values())},
            "ratio": measured["total"] / sum(ideal.values()),
            "detail_before_step": measured["detail"], "detail_after_step": worst["after_step"]["detail"],
        })
    z3 = stages[-1]
    data = {"meta": meta, "target": TARGET, "target_text": "ZeRO-3 per-rank bytes <= 1.1 x ideal 1/DP",
            "headline": {"value": z3["ratio"], "case": f"ZeRO-3, DP={args.dp}, {args.model} {args.precision}"},
            "model": args.model, "precision": args.precision, "dp": args.dp, "config": per_rank[0][0]["config"],
            "stages": stages}
    rows = []
    for s in stages:
        m, i = s["measured"], s["ideal"]
        rows.append([f"ZeRO-{s['stage']}", s["optimizer_class"], f"{s['param_elem_bytes']} / {s['grad_elem_bytes']}",
                     *(f"{fmt_num(m[c] / MiB)} / {fmt_num(i[c] / MiB)}" for c in ("params", "grads", "optimizer")),
                     fmt_num(m["other"] / MiB), f"**{fmt_num(m['total'] / MiB)}** / {fmt_num(i['total'] / MiB)}",
                     f"{s['ratio']:.3f}",
                     verdict(s["ratio"], TARGET, higher_is_better=False) if s["stage"] == 3 else "-",
                     fmt_num(s["after_step"]["total"] / MiB)])
    detail = []
    for s in stages:
        for cat, entries in s["detail_before_step"].items():
            for path, nbytes in list(entries.items())[:4]:
                if nbytes >= 0.01 * s["measured"]["total"]:
                    detail.append([f"ZeRO-{s['stage']}", cat, f"`{path}`", fmt_num(nbytes / MiB)])
    psi = stages[0]["psi"]
    md = f"""# P5: per-rank training-state memory, ZeRO 0/1/2/3 at DP={args.dp}

Model {args.model} ({psi:,} parameters), {args.precision}{" (`precision: auto` on this machine, as shipped)"
if requested == "auto" else ""}, {args.dp} ranks via the DeepSpeed launcher.
Bytes of the tensors each rank's engine holds (`largelm.train.state_bytes.training_state_bytes`: every storage
reachable from the module's parameters and from the DeepSpeed optimizer, counted once), read after the last
backward of step 2, before the optimizer step (parameters, complete gradients and Adam state all alive); the
rank holding more is shown. Ideal = 1/DP partitioning (ZeRO-1: optimizer state; ZeRO-2: + gradients; ZeRO-3:
+ parameters) of: weights and gradients at the engine's model and gradient-accumulation dtypes (column 3; largelm
accumulates bf16 gradients in fp32 under ZeRO >= 1), fp32 master weights when training in bf16 (4 B) and Adam's
two fp32 moments (8 B) per parameter. MiB, measured / ideal. Target: ZeRO-3 total <= {TARGET} x ideal.

{md_table(["stage", "DeepSpeed optimizer", "B/param: weight / grad accum", "params", "grads", "optimizer state",
           "other", "total", "measured / ideal", "target", "total after step"], rows)}

Largest tensors (>= 1% of the stage's total) behind these numbers:

{md_table(["stage", "category", "engine attribute", "MiB"], detail)}
"""
    write_result(NAME, data, md, plot="P5", meta=meta, run_notes=f"- model: `{json.dumps(per_rank[0][0]['config'])}`")
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.5, 3.8))
    x = range(len(stages))
    bottom = [0.0] * len(stages)
    for cat in ("params", "grads", "optimizer", "other"):
        vals = [s["measured"][cat] / MiB for s in stages]
        ax.bar(x, vals, 0.55, bottom=bottom, label=f"measured {cat}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter(x, [s["ideal"]["total"] / MiB for s in stages], marker="_", s=900, color="black", zorder=3,
               label="ideal 1/DP")
    for xi, s in zip(x, stages):
        ax.annotate(f"{s['ratio']:.2f}x", (xi, bottom[xi]), xytext=(0, 3), textcoords="offset points",
                    ha="center", fontsize=8)
    ax.set_ylim(top=max(bottom + [s["ideal"]["total"] / MiB for s in stages]) * 1.15)
    ax.set_xticks(list(x), [f"ZeRO-{s['stage']}" for s in stages])
    save_plot(fig, NAME, ax, ylabel="MiB per rank",
              title=f"P5: per-rank training state, DP={args.dp}, {args.model} {args.precision}",
              legend=dict(fontsize=7, loc="upper right", ncol=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

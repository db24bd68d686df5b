"""Scaling: training tokens/s with DP=1 vs DP=2 on this machine, through the real launcher and trainer.

Each run is ``largelm-launch --config <cfg> --nproc {1,2}`` (deepspeed launcher, gloo, DS_ACCELERATOR=cpu), i.e.
the whole training loop: webdataset loader with its worker, DeepSpeed engine, logging; ``train.precision: auto``
as shipped (each rank resolves it: bf16 where the machine computes it natively, fp32 elsewhere). The launcher gives each
rank cores/nproc threads (OMP_NUM_THREADS): DP=1 runs 1 rank x 2 threads, DP=2 runs 2 ranks x 1 thread on the
same 2 cores - so on this machine DP=2 can at best match DP=1; the figure shows what data parallelism costs
(gradient all-reduce over gloo, a second loader, duplicated optimizer work below ZeRO's partitioning) rather than
a speed-up. Same micro-batch and accumulation per rank (global batch doubles with DP). tokens/s = global
tokens/s from the trainer's log lines, first log interval (warm-up) dropped; runs alternate DP=1, DP=2, ...

    python bench/scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from common import SMALL, TINY, bench_config, config_summary, free_port
from report import REPO, finish_metadata, fmt_spread, md_table, plt, run_metadata, save_plot, stats, write_result

NAME = "scaling"
TPS = re.compile(r"^step (\d+)/\d+ .*?tokens/s ([\d,.]+)", re.MULTILINE)


def run(cfg_path: Path, nproc: int, timeout: int) -> tuple[list[float], str]:
    cmd = [sys.executable, "-m", "largelm.launch", "--config", str(cfg_path), "--nproc", str(nproc),
           "--master-port", str(free_port())]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)  # let the launcher split the cores, as for a user
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-6000:])
        raise SystemExit(f"training run failed: {' '.join(cmd)} (exit {proc.returncode})")
    values = [float(v.replace(",", "")) for _, v in TPS.findall(proc.stdout)]
    return values[1:], proc.stdout  # first interval includes warm-up


def write_config(tmp: Path, model: str, steps: int, log_interval: int, tag: str, dp: int = 1) -> tuple[Path, dict]:
    # as shipped: train.precision auto, resolved by each rank's preflight as in a user's run (bf16 where native)
    cfg = bench_config(model, precision="auto", zero_stage=2, micro_batch_size=8,
                       grad_accum_steps=2 if model == TINY else 1, steps=steps)
    raw = cfg.model_dump(mode="json")
    raw["train"].update(eval_interval=0, log_interval=log_interval)
    raw["checkpoint"].update(dir=str(tmp / f"ckpt-{tag}"), save_interval=0, resume=False)
    raw["logging"].update(tensorboard_dir=str(tmp / f"tb-{tag}"), progress_bar=False)
    path = tmp / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, config_summary(cfg, dp)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2, help="launches per (model, DP)")
    p.add_argument("--dp", default="1,2", help="data-parallel sizes to compare (GPU node: 1,8)")
    p.add_argument("--models", default=None, help=f"default {TINY},{SMALL}")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--timeout", type=int, default=600)
    args = p.parse_args(argv)
    meta = run_metadata()
    cores = os.cpu_count() or 1
    # (model, steps, log interval): a few log intervals after the first (warm-up) one
    plan = [(TINY, 50, 10), (SMALL, 16, 4)] if not args.quick else [(TINY, 20, 5)]
    if args.models:
        plan = [(m, 50, 10) for m in args.models.split(",")]
    reps = 1 if args.quick else args.reps
    dps = [int(x) for x in args.dp.split(",")]
    lo, hi = str(dps[0]), str(dps[-1])
    results = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        for model, steps, interval in plan:
            tps: dict[int, list[float]] = {dp: [] for dp in dps}
            summary = None
            for r in range(reps):
                for dp in dps:
                    cfg_path, summary = write_config(tmp, model, steps, interval, f"{model}-dp{dp}-{r}", dp)
                    values, _ = run(cfg_path, dp, args.timeout)
                    tps[dp] += values
                    print(f"[scaling {model}] rep {r + 1}/{reps} DP={dp}: tokens/s "
                          + ", ".join(f"{v:,.0f}" for v in values), flush=True)
            results.append({"model": model, "config": summary, "steps_per_run": steps, "log_interval": interval,
                            "tokens_per_s": {str(dp): stats(v) for dp, v in tps.items()},
                            "threads_per_rank": {str(dp): max(1, cores // dp) for dp in dps},
                            "dp2_over_dp1": stats(tps[dps[-1]])["median"] / stats(tps[dps[0]])["median"]})
    meta["configs"] = [f"{r['model']} precision auto (= {r['config']['precision']} here) ZeRO-2 "
                       f"mb{r['config']['micro_batch_size']}x{r['config']['grad_accum_steps']} per rank"
                       for r in results]
    meta["launcher"] = "largelm-launch (deepspeed launcher, gloo, DS_ACCELERATOR=cpu)"
    finish_metadata(meta)
    data = {"meta": meta, "target": None, "target_text": "reported, no target",
            "headline": {"value": results[0]["dp2_over_dp1"],
                         "case": f"{results[0]['model']}: DP={hi} / DP={lo} tokens/s"},
            "dp": dps,
            "cases": results}
    rows = []
    for r in results:
        for dp in map(str, dps):
            ratio = stats([v / r["tokens_per_s"][lo]["median"] for v in r["tokens_per_s"][dp]["values"]])
            rows.append([r["model"], dp, f"{dp} x {r['threads_per_rank'][dp]}", fmt_spread(r["tokens_per_s"][dp]),
                         f"{ratio['median']:.2f}" if dp != lo else "1 (reference)"])
    md = f"""# Scaling: DP=1 vs DP=2 on this {cores}-core machine

Real runs: `largelm-launch --nproc N` (deepspeed launcher, gloo), the full trainer with its loader; as shipped,
`precision: auto` (= {results[0]['config']['precision']} on this machine), ZeRO-2, same micro-batch x accumulation
per rank. The launcher splits the cores between ranks (OMP_NUM_THREADS =
cores / N), so DP=2 shares the same {cores} cores as DP=1: there is no extra hardware to scale onto, and the ratio
measures the cost of data parallelism (gloo all-reduce, a loader per rank) against intra-op threading.
Global tokens/s from the trainer's log lines (one value per log interval, first interval dropped), median [IQR]
(min-max) over {reps} alternating launches per DP.

{md_table(["model", "DP", "ranks x threads (CPU)", "global tokens/s", f"/ DP={lo}"], rows)}
"""
    write_result(NAME, data, md, plot="scaling", meta=meta)
    pyplot = plt()
    fig, axes = pyplot.subplots(1, len(results), figsize=(3.2 * len(results), 3.4), squeeze=False)
    for ax, r in zip(axes[0], results):
        st = [r["tokens_per_s"][str(dp)] for dp in dps]
        ax.bar([f"DP={dp}\n{dp}x{r['threads_per_rank'][str(dp)]} thr" for dp in dps], [s["median"] for s in st],
               yerr=[[s["median"] - s["q1"] for s in st], [s["q3"] - s["median"] for s in st]], capsize=3,
               color=["tab:blue", "tab:orange", "tab:green", "tab:red"][:len(dps)])
        ax.set_title(f"{r['model']}: x{r['dp2_over_dp1']:.2f}", fontsize=9)
        ax.set_ylabel("global tokens/s")
    fig.suptitle("Scaling on this machine (same cores)", fontsize=10)
    save_plot(fig, NAME)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

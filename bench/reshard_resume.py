"""Resharded resume vs plain resume: seconds from ``Trainer(cfg)`` to a resumed, ready-to-step trainer for gpt-25m
(~25M parameters, fp32), side by side in one run.

The source is a DP=2 ZeRO-1 checkpoint after one step. Per target layout two arms resume the *same state* into the
*same layout* (so they build the same engine on the same number of ranks):

* ``plain``: a checkpoint already written in the target layout (by a first, untimed resharded resume that saved at
  the same step: its state equals the source's bit for bit, tests/test_elastic_resume.py), loaded by DeepSpeed's
  own same-layout path;
* ``resharded``: the DP=2 checkpoint with ``checkpoint.reshard_on_resume`` (every rank reads and merges the full
  state, builds the engine from it and writes its shard of masters and Adam moments:
  largelm/checkpoint/elastic.py).

Targets: DP=1 (one replica: DeepSpeed runs ZeRO-0) and DP=2 ZeRO-3. The time includes what both arms do
(process group, model build, DeepSpeed initialize, loader) besides the load itself: that is what a user waits for.
Repetitions alternate the arms (plain, resharded, plain, ...); each is a fresh set of spawned ranks.

    python bench/reshard_resume.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import SMALL, bench_config
from report import finish_metadata, fmt_spread, md_table, plt, ratio_stats, run_metadata, save_plot, stats, write_result

NAME = "reshard_resume"
TARGETS = {"DP=1": (1, []), "DP=2 ZeRO-3": (2, ["parallel.zero_stage=3"])}


def _resume_rank(rank: int, world_size: int, config: str, overrides: list, action: str) -> dict:
    """Time ``Trainer(cfg)`` (it restores the checkpoint); ``action`` "fit": train (the source), "save": save at
    the resumed step (writes the plain arm's checkpoint), "time": only the resume."""
    from largelm.config import load_config
    from largelm.train.preflight import preflight
    from largelm.train.trainer import Trainer

    cfg = preflight(load_config(config, list(overrides)), world_size)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    seconds = time.perf_counter() - start
    try:
        if action == "fit":
            trainer.fit()
        elif action == "save":
            trainer.save()
        return {"seconds": seconds, "step": trainer.step}
    finally:
        trainer.close()


def _ranks(config: Path, world: int, overrides: list, action: str = "time") -> float:
    from largelm.convert.spawn import run_ranks

    results = run_ranks(_resume_rank, world, str(config), overrides, action, timeout_s=900)
    return max(r["seconds"] for r in results)  # the job is ready when its slowest rank is


def _config(tmp: Path, name: str, ckpt: Path) -> Path:
    cfg = bench_config(SMALL, zero_stage=1, micro_batch_size=4, grad_accum_steps=1, steps=4,
                       **{"train.exit_interval": 1, "train.eval_interval": 0, "data.num_workers": 0,
                          "checkpoint.dir": str(ckpt), "checkpoint.save_interval": 0,
                          "logging.tensorboard_dir": None, "logging.progress_bar": False,
                          "logging.peak_tflops_per_rank": 1.0})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    meta = run_metadata(model=SMALL, source_layout="TP=1 PP=1 DP=2 ZeRO-1 fp32", reps=args.reps)
    results = {}
    with tempfile.TemporaryDirectory(prefix="largelm-reshard-bench-") as tmp:
        tmp = Path(tmp)
        source = tmp / "source"
        _ranks(_config(tmp, "source", source), 2, [], action="fit")  # 1 step, then the checkpoint of step 1
        for target, (world, overrides) in TARGETS.items():
            key = target.replace(" ", "_").replace("=", "")
            plain_dir, resharded_dir = tmp / f"plain-{key}", tmp / f"resharded-{key}"
            shutil.copytree(source, plain_dir)
            plain_cfg = _config(tmp, f"plain-{key}", plain_dir)
            _ranks(plain_cfg, world, [*overrides, "checkpoint.reshard_on_resume=true"], action="save")  # untimed
            shutil.copytree(source, resharded_dir)
            resharded_cfg = _config(tmp, f"resharded-{key}", resharded_dir)
            times: dict[str, list[float]] = {"plain": [], "resharded": []}
            reshard = [*overrides, "checkpoint.reshard_on_resume=true"]
            for rep in range(args.reps):
                times["plain"].append(_ranks(plain_cfg, world, overrides))
                times["resharded"].append(_ranks(resharded_cfg, world, reshard))
                print(f"[reshard] {target} rep {rep}: plain {times['plain'][-1]:.2f} s, resharded "
                      f"{times['resharded'][-1]:.2f} s", flush=True)
            results[target] = {"world_size": world, "plain_s": stats(times["plain"]),
                               "resharded_s": stats(times["resharded"]),
                               "ratio": ratio_stats(times["resharded"], times["plain"]), "raw": times}
    finish_metadata(meta)
    rows = [[target, r["world_size"], fmt_spread(r["plain_s"]), fmt_spread(r["resharded_s"]),
             f"{r['ratio']['median']:.2f}x"] for target, r in results.items()]
    md = f"""# Resharded resume vs plain resume

gpt-25m (fp32), source checkpoint DP=2 ZeRO-1 at step 1. Seconds from `Trainer(cfg)` to a trainer ready for the
next step (slowest rank; process group, model build, DeepSpeed initialize and the checkpoint load), the same state
resumed into the same target layout: `plain` = a checkpoint already in that layout (DeepSpeed's own load),
`resharded` = the DP=2 checkpoint with `checkpoint.reshard_on_resume=true`. Median [IQR] (min-max) over
{args.reps} alternating repetitions; ratio = resharded / plain (median of per-repetition ratios).

{md_table(["target layout", "ranks", "plain resume (s)", "resharded resume (s)", "ratio"], rows)}
"""
    write_result(NAME, {"meta": meta, "results": results}, md, plot="resharded vs plain resume", meta=meta)
    fig, ax = plt().subplots(figsize=(6, 3.2))
    names = list(results)
    width = 0.38
    xs = range(len(names))
    ax.bar([x - width / 2 for x in xs], [results[n]["plain_s"]["median"] for n in names], width, label="plain",
           color="#999")
    ax.bar([x + width / 2 for x in xs], [results[n]["resharded_s"]["median"] for n in names], width,
           label="resharded", color="#3a7")
    ax.set_xticks(list(xs), names)
    save_plot(fig, NAME, ax, ylabel="seconds to a resumed trainer (median)",
              title="gpt-25m resume from DP=2 ZeRO-1")
    return 0


if __name__ == "__main__":
    sys.exit(main())

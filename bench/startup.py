"""Start-up: seconds from ``largelm-launch`` to the first training step, gpt-tiny on 2 ranks (deepspeed launcher,
gloo), and to the end of a 1-step run, for this tree and for a git revision given as the baseline (checked out in
a temporary worktree; same Python environment, same data). Runs alternate baseline, this tree, baseline, ...

The compiled DeepSpeed CPU comm op is built before timing (each tree builds it where it keeps it), so the figure
is the start-up a user sees once the machine is set up; a build, when one happens, is reported separately.

    python bench/startup.py --baseline 6e2a531 [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import TINY, free_port
from report import REPO, finish_metadata, fmt_spread, md_table, plt, run_metadata, save_plot, stats, write_result

NAME = "startup"
TARGET_S = 15.0
FIRST_STEP = re.compile(r"^step 1/")


def _timed_run(tree: Path, cfg_path: Path, timeout: int) -> tuple[float, float]:
    """(seconds to the first step line, seconds to exit) of one launch from ``tree``."""
    cmd = [sys.executable, "-m", "largelm.launch", "--config", str(cfg_path), "--nproc", "2",
           "--master-port", str(free_port())]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(tree), DS_ACCELERATOR="cpu")
    env.pop("OMP_NUM_THREADS", None)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first is None and FIRST_STEP.match(line):
            first = time.monotonic() - start
    proc.wait(timeout=timeout)
    if proc.returncode != 0 or first is None:
        raise RuntimeError(f"launch from {tree} failed ({proc.returncode}):\n{''.join(lines)[-3000:]}")
    return first, time.monotonic() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="git revision to compare with (e.g. the commit before a change)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--timeout", type=int, default=600)
    args = p.parse_args(argv)
    meta = run_metadata(model=TINY, ranks=2, baseline=args.baseline)
    with tempfile.TemporaryDirectory(prefix="largelm-startup-") as tmp:
        tmp = Path(tmp)
        base_tree = tmp / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.baseline], cwd=REPO, check=True,
                       capture_output=True)
        try:
            # the shipped quickstart config as a plain dict (both trees' schemas read it), one fp32 step
            cfg = yaml.safe_load((REPO / "configs" / "gpt-tiny.yaml").read_text())
            data = REPO / "data" / "default"
            cfg["tokenizer"]["model"] = str(data / "tokenizer" / "spm.model")
            cfg["data"].update(train=[{"path": str(data / "shards" / "train")}],
                               valid=[{"path": str(data / "shards" / "valid")}])
            cfg["optimizer"]["warmup_steps"] = 0
            cfg["train"].update(steps=1, precision="fp32", eval_interval=0, log_interval=1)
            cfg["checkpoint"] = {"dir": str(tmp / "ckpt"), "save_interval": 0, "resume": False}
            cfg["logging"] = {"tensorboard_dir": str(tmp / "tb"), "progress_bar": False, "peak_tflops_per_rank": 1.0}
            cfg_path = tmp / "config.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            trees = {f"baseline {args.baseline}": base_tree, "this tree": REPO}
            for tree in trees.values():  # warm-up: compiled ops built, page cache warm (not timed)
                _timed_run(tree, cfg_path, args.timeout)
            first: dict[str, list[float]] = {k: [] for k in trees}
            total: dict[str, list[float]] = {k: [] for k in trees}
            for rep in range(args.reps):
                for name, tree in trees.items():
                    f, t = _timed_run(tree, cfg_path, args.timeout)
                    first[name].append(f)
                    total[name].append(t)
                    print(f"rep {rep}: {name}: first step {f:.1f} s, exit {t:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, capture_output=True)
    results = {name: {"first_step_s": stats(first[name]), "total_s": stats(total[name])} for name in first}
    finish_metadata(meta)
    rows = [[name, fmt_spread(r["first_step_s"]), fmt_spread(r["total_s"]),
             "met" if r["first_step_s"]["median"] <= TARGET_S else "missed"] for name, r in results.items()]
    md = f"""# Start-up: launch to first step

`largelm-launch --nproc 2` on gpt-tiny (fp32, 1 step), this tree vs the baseline revision, alternating, after one
untimed warm-up run each. Seconds: median [IQR] (min-max) over {args.reps} runs. Target: first step <= {TARGET_S:g} s.

{md_table(["tree", "launch -> first step (s)", "launch -> exit (s)", f"target <= {TARGET_S:g} s"], rows)}
"""
    write_result(NAME, {"meta": meta, "target_s": TARGET_S, "results": results}, md, plot="startup", meta=meta)
    fig, ax = plt().subplots(figsize=(6, 3.2))
    names = list(results)
    ax.bar(names, [results[n]["first_step_s"]["median"] for n in names], color=["#999", "#3a7"])
    ax.axhline(TARGET_S, color="#c33", linestyle="--", label=f"target {TARGET_S:g} s")
    save_plot(fig, NAME, ax, ylabel="seconds to the first step (median)", title="Start-up, gpt-tiny on 2 ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MoE vs dense at equal active compute: configs/moe-tiny.yaml (8 experts of ffn 128, top-2, EP=2) against the dense
llama model of the same active parameters (the same attention, one MLP of ffn 256 = top-2 x 128), trained the same
steps on the same tokens (data/default, same seeds and LR schedule), through the real launcher on ``--nproc`` ranks.

Reported per arm: total and active parameters (``largelm.model.flops``), model FLOPs per token, training tokens/s
(median of the trainer's step lines, the first log interval dropped) and validation loss/perplexity after the same
number of tokens. The point of MoE is a better loss at equal compute per token (at the price of E/k x the MLP
parameters); on 2 CPU cores the allgather dispatch and the per-expert loops cost wall time a GPU would hide less or
more - the tokens/s ratio is this machine's, measured in one run of this script (arms back to back).

    python bench/moe_vs_dense.py [--steps 200] [--nproc 2]

Writes bench/results/moe_vs_dense.{json,md}. Uses LARGELM_BENCH_DATA like the other benchmarks.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from pathlib import Path

import yaml
from common import launch_training, shipped_precision
from report import DATA, REPO, finish_metadata, md_table, run_metadata, write_result

from largelm.config import config_from_dict
from largelm.model.flops import flops_per_token, matmul_parameter_count, moe_matmul_parameter_count
from largelm.model.layout import gpt_param_shapes, moe_param_shapes

VALID = re.compile(r"^step (\d+) valid loss ([0-9.]+) ppl ([0-9.]+)", re.MULTILINE)
TPS = re.compile(r"^step (\d+)/\d+ .*?tokens/s ([\d,.]+)", re.MULTILINE)
VOCAB = 4096  # data/default's tokenizer (only for the parameter counts; the runs read the tokenizer)


def arm_config(work: Path, name: str, steps: int, eval_steps: int, nproc: int) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "moe-tiny.yaml").read_text())
    cfg["name"] = name
    if name == "dense":  # the same model with one MLP of the experts' active size instead of the MoE layer
        moe = cfg["model"].pop("moe")
        cfg["model"].update(arch="gpt", ffn_hidden_size=moe["top_k"] * moe["ffn_size"])
        cfg["parallel"].pop("expert_parallel")
    else:
        cfg["parallel"]["expert_parallel"] = nproc
    cfg["tokenizer"]["model"] = str(DATA / "tokenizer" / "spm.model")
    cfg["data"]["train"] = [{"path": str(DATA / "shards" / "train")}]
    cfg["data"]["valid"] = [{"path": str(DATA / "shards" / "valid")}]
    cfg["optimizer"]["warmup_steps"] = min(30, steps // 10)
    cfg["train"].update(steps=steps, eval_interval=steps, eval_steps=eval_steps, log_interval=max(1, steps // 20),
                        precision="auto", seed=1234)
    cfg["checkpoint"] = {"dir": str(work / name / "checkpoints"), "save_interval": 0, "keep_last": 1, "resume": False}
    cfg["logging"] = {"tensorboard_dir": str(work / name / "tensorboard"), "progress_bar": False}
    return cfg


def counts(cfg: dict) -> dict:
    model = config_from_dict({**cfg, "model": {**cfg["model"], "vocab_size": VOCAB}}).model
    rows = model.padded_vocab_size()
    shapes = moe_param_shapes(model, rows) if model.arch == "moe" else gpt_param_shapes(model, rows)
    active = moe_matmul_parameter_count(model) if model.arch == "moe" else matmul_parameter_count(model)
    return {"params": sum(math.prod(s) for s in shapes.values()), "active_matmul_params": active,
            "flops_per_token": flops_per_token(model)}


def run(cfg: dict, work: Path, nproc: int) -> dict:
    path = work / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log = work / f"{cfg['name']}.log"
    out, seconds = launch_training(path, nproc, log)
    step, loss, ppl = VALID.findall(out)[-1]
    rates = [float(r.replace(",", "")) for _, r in TPS.findall(out)][1:]
    return {"valid_loss": float(loss), "valid_ppl": float(ppl), "step": int(step),
            "tokens_per_s": statistics.median(rates) if rates else float("nan"),
            "seconds": seconds, "log": str(log)}


def write_results(args, meta: dict, results: dict) -> str:
    rows = [[name, f"{r['params'] / 1e6:.2f}M", f"{r['active_matmul_params'] / 1e6:.2f}M",
             f"{r['flops_per_token'] / 1e6:.1f}M", f"{r.get('tokens_per_s', float('nan')):,.0f}",
             f"{r.get('valid_loss', float('nan')):.4f}", f"{r.get('valid_ppl', float('nan')):.1f}"]
            for name, r in results.items()]
    done = all("valid_loss" in r for r in results.values()) and len(results) == 2
    summary = "(run incomplete)"
    if done:
        moe, dense = results["moe"], results["dense"]
        summary = (f"MoE - dense validation loss: {moe['valid_loss'] - dense['valid_loss']:+.4f} after the same "
                   f"{args.steps} steps; tokens/s ratio MoE/dense: {moe['tokens_per_s'] / dense['tokens_per_s']:.2f}")
    md = "\n".join([
        "# MoE vs dense of the same active parameters", "",
        f"configs/moe-tiny.yaml (8 experts x ffn 128, top-2, EP={args.nproc}) vs the dense llama model with ffn 256 "
        f"(same attention, embeddings, data order, seeds, LR schedule); {args.steps} steps, {args.nproc} rank(s), "
        f"ZeRO-2, `precision: auto` (= {shipped_precision()[0]} here); validation over {args.eval_steps} batches. "
        f"Reproduce: `python bench/moe_vs_dense.py --steps {args.steps} --nproc {args.nproc}`.", "",
        md_table(["arm", "params", "active matmul params", "FLOPs/token", "tokens/s", "valid loss", "valid ppl"],
                 rows), "", summary,
    ])
    finish_metadata(meta)
    write_result("moe_vs_dense", {"meta": meta, "results": results}, md, meta=meta)
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-steps", type=int, default=16)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--work", default=str(REPO / "runs" / "bench-moe"))
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    meta = run_metadata(config={"steps": args.steps, "nproc": args.nproc, "eval_steps": args.eval_steps,
                                "data": str(DATA), "precision": f"auto (= {shipped_precision()[0]} here)"})
    results: dict = {}
    for name in ("moe", "dense"):
        cfg = arm_config(work, name, args.steps, args.eval_steps, args.nproc)
        results[name] = counts(cfg)
        results[name].update(run(cfg, work, args.nproc))
        print(name, results[name], flush=True)
        print(write_results(args, meta, results))  # after every arm: a partial table survives an interruption
    return 0


if __name__ == "__main__":
    sys.exit(main())

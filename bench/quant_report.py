"""Quantization on a model whose transformer linears dominate: int8 / int4 x RTN / GPTQ / AWQ on the 25M bench GPT.

    python bench/quant_report.py [--steps 200] [--micro-batch 2] [--group-size 128] [--eval-batches 8]

1. Train ``gpt-25m`` (bench/common.py: 8 layers, h=512, 8 heads, seq 128, 4096-token vocabulary; 27.4M
   parameters, 25.2M of them in the transformer linears) from scratch in fp32 on data/default's training shards:
   plain ``torch.optim.AdamW`` in-process (linear warm-up, cosine decay), ``--steps`` x ``--micro-batch`` sequences.
2. Calibration (GPTQ's Hessians, AWQ's activation statistics): ``--calib-batches`` x 8 sequences of the *training*
   shards. Evaluation: the first ``--eval-batches`` x 8 sequences of the *validation* shards (seen by neither
   training nor calibration), the same tokens for every model, computed in fp32.
3. Models: the fp32 weights; the bf16 export (the size baseline; its weights rounded to bf16); and for int8
   (per channel) and int4 (``--group-size``) each of RTN, GPTQ and AWQ, each quantized from the same fp32 weights,
   saved with ``save_quantized`` and evaluated as reloaded by ``load_quantized`` (what a user runs).
   Sizes: ``model.safetensors`` on disk, and the bytes of the quantized linears' tensors alone (integer weights,
   scales, zero points, biases, AWQ input scales) vs the same linears in bf16.

Writes bench/results/quant_report.{json,md,png}. Uses LARGELM_BENCH_DATA like the other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from common import SMALL, bench_config, init_single_rank, seed_all
from report import DATA, REPO, RESULTS, finish_metadata, md_table, plt, run_metadata, save_plot, write_result

NAME = "quant_report"
CALIB_BATCH = 8
EVAL_BATCH = 8


def train(cfg, steps: int, lr: float, log_every: int = 25) -> tuple[object, dict]:
    """The model trained from scratch (fp32, in-process AdamW) and a record of the run."""
    import torch

    from largelm.data import build_loader
    from largelm.model.gpt import gpt_forward_loss
    from largelm.quant import build_model

    seed_all(1234)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 10)

    def lr_at(step):  # linear warm-up, cosine to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))

    loader = build_loader([(s.path, s.weight) for s in cfg.data.train], seq_length=cfg.model.seq_length,
                          batch_size=cfg.train.micro_batch_size, num_workers=0, shuffle_buffer=256, seed=1234,
                          infinite=True)
    batches = iter(loader)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        _, loss = gpt_forward_loss(model, next(batches)["tokens"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            elapsed = time.perf_counter() - t0
            tps = (step + 1) * cfg.train.micro_batch_size * cfg.model.seq_length / elapsed
            print(f"[train] step {step + 1}/{steps} loss {loss.item():.3f} {tps:,.0f} tokens/s "
                  f"(eta {elapsed / (step + 1) * (steps - step - 1):.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    tokens = steps * cfg.train.micro_batch_size * cfg.model.seq_length
    return model.eval(), {"steps": steps, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                          "lr": lr, "warmup": warmup, "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
                          "loss_every_25": losses[::25]}


def calibration(cfg, count: int) -> list:
    from largelm.data import build_loader

    loader = build_loader([(s.path, s.weight) for s in cfg.data.train], seq_length=cfg.model.seq_length,
                          batch_size=CALIB_BATCH, num_workers=0, shuffle_buffer=256, seed=99, infinite=True)
    it = iter(loader)
    return [next(it)["tokens"] for _ in range(count)]


def linear_bytes(model) -> dict:
    """Bytes of the quantized linears' tensors, and of the same linears in bf16 (weight + bias)."""
    from largelm.quant import QuantLinear

    quant = bf16 = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            for t in (module.qweight, module.scale, module.zero, module.input_scale):
                quant += 0 if t is None else t.numel() * t.element_size()
            quant += 0 if module.bias is None else module.bias.numel() * 2  # stored bf16
            bf16 += 2 * (module.out_features * module.in_features + (0 if module.bias is None else module.out_features))
    return {"quantized": quant, "bf16": bf16}


def run(args) -> dict:
    import torch

    from largelm.model.weights import load_full_state_dict
    from largelm.quant import QuantFormat, build_model, load_quantized, perplexity, quantize_model, save_quantized
    from largelm.quant.model import dir_bytes

    cfg = bench_config(SMALL, precision="fp32", micro_batch_size=args.micro_batch, grad_accum_steps=1,
                       steps=args.steps)
    model, training = train(cfg, args.steps, args.lr)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    n_params = sum(p.numel() for p in model.parameters())

    def evaluate(m) -> dict:
        t0 = time.perf_counter()
        out = perplexity(m, cfg, batch_size=EVAL_BATCH, max_batches=args.eval_batches)
        out["seconds"] = time.perf_counter() - t0
        return out

    def fresh():
        m = build_model(cfg)
        load_full_state_dict(m, state)
        return m.eval()

    rows = {"fp32": {"method": "none", "bits": 32, **evaluate(model)}}
    print(f"[eval] fp32 ppl {rows['fp32']['ppl']:.3f}", flush=True)
    calib = calibration(cfg, args.calib_batches)
    with tempfile.TemporaryDirectory() as tmp:
        bf16_dir = save_quantized(model, cfg, Path(tmp) / "bf16", method="none", fmt=None)
        rows["bf16"] = {"method": "none", "bits": 16, "file_bytes": dir_bytes(bf16_dir),
                        **evaluate(load_quantized(bf16_dir)[0])}
        print(f"[eval] bf16 ppl {rows['bf16']['ppl']:.3f}", flush=True)
        for bits in (8, 4):
            fmt = QuantFormat(bits, args.group_size if bits == 4 else None)
            for method in ("rtn", "gptq", "awq"):
                key = f"int{bits} {method}"
                stats: dict = {}
                m = fresh()
                t0 = time.perf_counter()
                quantize_model(m, fmt, method, calib if method != "rtn" else None,
                               awq_options={"search_tokens": args.awq_search_tokens}, stats=stats)
                seconds = time.perf_counter() - t0
                sizes = linear_bytes(m)
                out = save_quantized(m, cfg, Path(tmp) / key.replace(" ", "-"), method=method, fmt=fmt)
                del m
                row = {"method": method, "bits": bits, "group_size": fmt.group_size, "quantize_seconds": seconds,
                       "file_bytes": dir_bytes(out), "linear_bytes": sizes["quantized"],
                       "linear_bytes_bf16": sizes["bf16"], **evaluate(load_quantized(out)[0])}
                if stats:
                    alphas = [s["alpha"] for s in stats.values()]
                    row["awq"] = {"alpha_mean": sum(alphas) / len(alphas), "alpha_min": min(alphas),
                                  "alpha_max": max(alphas),
                                  "search_error_ratio_mean": sum(s["error"] / s["error_rtn"] for s in stats.values())
                                  / len(stats),
                                  "scale_to": sorted({s["scale_to"] for s in stats.values()}),
                                  "layers": stats}
                rows[key] = row
                print(f"[{key}] ppl {row['ppl']:.3f} ({100 * (row['ppl'] / rows['fp32']['ppl'] - 1):+.2f}%), "
                      f"{row['file_bytes']:,} B, quantized in {seconds:.0f} s", flush=True)
    linears = sum(m.weight.numel() for n, m in build_model(cfg).named_modules()
                  if n.split(".")[-1] in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))
    return {"config": {"model": SMALL, "params": n_params, "linear_params": linears,
                       "seq_length": cfg.model.seq_length, "vocab": cfg.model.padded_vocab_size(),
                       "micro_batch": args.micro_batch, "group_size": args.group_size,
                       "calib_tokens": args.calib_batches * CALIB_BATCH * cfg.model.seq_length,
                       "eval_batches": args.eval_batches, "awq_search_tokens": args.awq_search_tokens,
                       "data": str(DATA)},
            "training": training, "rows": rows}


def markdown(result: dict, args, meta: dict) -> str:
    c, t, rows = result["config"], result["training"], result["rows"]
    base = rows["fp32"]
    bf16 = rows["bf16"]["file_bytes"]
    table = []
    for key, r in rows.items():
        size = r.get("file_bytes")
        lin = (f"{r['linear_bytes']:,} ({r['linear_bytes'] / r['linear_bytes_bf16']:.1%})"
               if "linear_bytes" in r else "")
        table.append([key, f"{r['loss']:.4f}", f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}%",
                      "" if size is None else f"{size:,} ({size / bf16:.1%})", lin,
                      f"{r['quantize_seconds']:.0f}" if "quantize_seconds" in r else ""])
    awq_lines = [f"* {k}: alpha mean {r['awq']['alpha_mean']:.2f} (min {r['awq']['alpha_min']:.2f}, max "
                 f"{r['awq']['alpha_max']:.2f}); searched output error / RTN's, mean over layers "
                 f"{r['awq']['search_error_ratio_mean']:.3f}; scales went to: {', '.join(r['awq']['scale_to'])}"
                 for k, r in rows.items() if "awq" in r]
    load = (f"1-minute load average {meta.get('load_avg_1min_at_start')} at start, "
            f"{meta.get('load_avg_1min_at_end')} at end, on {meta.get('cores')} cores")
    busy = ""
    if (meta.get("load_avg_1min_at_start") or 0) > (meta.get("cores") or 1):
        busy = (f" (the run shared its CPU cores with other jobs: {load}; its tokens/s and quantize seconds are not an "
                "idle machine's, and the step count was sized to that speed)")
    return "\n".join([
        "# Weight-only quantization of the 25M bench GPT: int8 / int4 x RTN / GPTQ / AWQ", "",
        f"Model: {c['model']} ({c['params'] / 1e6:.1f}M parameters, {c['linear_params'] / 1e6:.1f}M in the "
        f"transformer linears that are quantized; embeddings (tied output layer) and norms stay bf16), trained from "
        f"scratch in fp32 for {t['steps']} steps x {c['micro_batch']} x {c['seq_length']} tokens "
        f"({t['tokens']:,} tokens, {t['seconds']:.0f} s at {t['tokens_per_s']:,.0f} tokens/s here; final train "
        f"loss {t['final_train_loss']:.3f}) on {os.path.relpath(DATA, REPO) if DATA.is_relative_to(REPO) else DATA}. "
        f"Calibration: {c['calib_tokens']:,} tokens of the training shards (GPTQ, AWQ; AWQ searches each scale on "
        f"{c['awq_search_tokens']} sampled tokens). Validation: {base['tokens']:,} tokens of the validation shards, "
        f"the same for every row, fp32 compute, each quantized model as reloaded from its directory. "
        f"int4: group size {c['group_size']}, asymmetric; int8: per output channel, symmetric.", "",
        md_table(["model", "valid loss", "valid ppl", "ppl vs fp32", "file bytes (vs bf16 file)",
                  "linears bytes (vs bf16 linears)", "quantize s"], table), "",
        *awq_lines, "",
        f"Reading it: this model saw only {t['tokens']:,} training tokens{busy}. A barely trained model has few "
        "outlier weights or activations and a high "
        "perplexity, so the differences between methods are small and their order could flip on a better trained "
        "model; each figure is one measurement on one fixed validation set (paired: every row sees the same "
        "tokens). Reproduce: "
        f"`python bench/quant_report.py --steps {args.steps} --micro-batch {args.micro_batch} "
        f"--group-size {args.group_size} --calib-batches {args.calib_batches} --eval-batches {args.eval_batches} "
        f"--awq-search-tokens {args.awq_search_tokens}` (LARGELM_BENCH_DATA for another data directory).",
    ])


def plot(result: dict) -> None:
    rows = result["rows"]
    base = rows["fp32"]["ppl"]
    pyplot = plt()
    fig, (ax1, ax2) = pyplot.subplots(1, 2, figsize=(9, 3.6))
    keys = [k for k in rows if k.startswith("int")]
    colors = {"rtn": "tab:gray", "gptq": "tab:blue", "awq": "tab:orange"}
    ax1.bar(keys, [100 * (rows[k]["ppl"] / base - 1) for k in keys], color=[colors[rows[k]["method"]] for k in keys])
    ax1.set_ylabel("validation ppl vs fp32 (%)")
    ax1.tick_params(axis="x", rotation=45)
    ax1.axhline(100 * (rows["bf16"]["ppl"] / base - 1), color="k", lw=0.8, ls="--", label="bf16 weights")
    ax1.legend(fontsize=8)
    keys2 = ["bf16", *keys]
    ax2.bar(keys2, [rows[k]["file_bytes"] / 2**20 for k in keys2],
            color=["tab:green", *[colors[rows[k]["method"]] for k in keys]])
    ax2.set_ylabel("model.safetensors (MiB)")
    ax2.tick_params(axis="x", rotation=45)
    save_plot(fig, NAME, title=None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per training step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--group-size", type=int, default=128, help="int4 group size")
    p.add_argument("--calib-batches", type=int, default=4, help=f"calibration batches of {CALIB_BATCH} sequences")
    p.add_argument("--eval-batches", type=int, default=8, help=f"validation batches of {EVAL_BATCH} sequences")
    p.add_argument("--awq-search-tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--render", action="store_true", help="only rewrite the .md/.png from the existing .json")
    args = p.parse_args(argv)
    raw = RESULTS / f"{NAME}.json"
    if args.render:
        data = json.loads(raw.read_text())
        meta, result = data.pop("meta"), data
        args = argparse.Namespace(**{**vars(args), **meta["config"]})
    else:
        init_single_rank(args.threads)
        meta = run_metadata(config=vars(args))
        t0 = time.perf_counter()
        result = run(args)
        meta["wall_seconds"] = round(time.perf_counter() - t0, 1)
        finish_metadata(meta)
        RESULTS.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps({"meta": meta, **result}, indent=1, default=float) + "\n")  # before rendering
    plot(result)
    write_result(NAME, {"meta": meta, **result}, markdown(result, args, meta), plot="validation perplexity change and "
                 "file size per format and method", meta=meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())

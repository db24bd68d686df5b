"""P4 - data path: tokens/s the webdataset loader delivers alone vs tokens/s training consumes.

Loader alone: ``largelm.data.build_loader`` exactly as the trainer builds it (training shards, shuffle buffer and
seed of configs/gpt-tiny.yaml, sha256-verified shards, rank 0 of 1) with 1 and 2 DataLoader workers (and 0 =
in the main process, for reference), iterated by the main process with no model. Training: largelm's step
(``DenseStep``, 1 process, all cores) on batches already in memory, in the precision largelm ships
(``train.precision: auto``: bf16 where the machine computes it natively, fp32 elsewhere - the faster of the two
on either kind of machine), for the quickstart model (gpt-tiny, the fastest consumer, so the worst case for this
ratio) and the ~25M model. Blocks interleaved in one process;
per-repetition ratio loader tokens/s / training tokens/s. Tokens = predicted positions (micro-batch x seq_length).
Target: >= 20x (the loader then needs <= 5% of the time it feeds).

Note: between loader blocks the persistent DataLoader workers refill their prefetch queue (2 batches per
worker); a block reads many more batches than that, so this inflates the loader figure by ~1-2% at most.

    python bench/p4_data.py [--quick]
"""

from __future__ import annotations

import argparse
import gc
import os
import time

from common import (
    DEFAULT_BATCH,
    SMALL,
    TINY,
    Cycle,
    bench_config,
    init_single_rank,
    real_batches,
    seed_all,
    shipped_precision,
    sync,
)
from report import (
    REPO,
    finish_metadata,
    fmt_spread,
    md_table,
    plt,
    ratio_stats,
    run_metadata,
    save_plot,
    stats,
    verdict,
    write_result,
)

TARGET = 20.0
NAME = "p4_data"
WORKERS = (0, 1, 2)


def loader_bench_setup(doc: str, argv, more_args=None):
    """The P4 loader benchmarks' shared start (this file and p4_remote.py): their flags, one rank, the run's metadata
    and the loader settings of the gpt-tiny run whose consumption they compare with: ``(args, meta, reps, batches,
    cfg)``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batches", type=int, default=400, help="loader batches per repetition")
    if more_args is not None:
        more_args(p)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    init_single_rank(args.threads)
    meta = run_metadata()
    reps, nbatches = (2, 100) if args.quick else (args.reps, args.batches)
    cfg = bench_config(TINY, zero_stage=2, micro_batch_size=8, grad_accum_steps=2)  # the loader's settings
    return args, meta, reps, nbatches, cfg


def main(argv=None) -> int:
    args, meta, reps, nbatches, cfg = loader_bench_setup(__doc__, argv, lambda p: p.add_argument(
        "--models", default=f"{TINY},{SMALL}", help="training consumers (ZeRO-2, train.precision: auto as shipped)"))

    import arms

    from largelm.data import build_loader

    d = cfg.data
    seq, mb = cfg.model.seq_length, cfg.train.micro_batch_size
    iters = {}
    for w in WORKERS:
        loader = build_loader([(s.path, s.weight) for s in d.train], seq_length=seq, batch_size=mb, num_workers=w,
                              shuffle_buffer=d.shuffle_buffer, seed=d.seed, infinite=True)
        it = iter(loader)
        for _ in range(20):  # worker start-up, first shards opened and verified
            next(it)
        iters[w] = it

    consumers = {}
    prec, why = shipped_precision()  # the consumers train as shipped: precision auto, resolved on this machine
    print(f"[P4] training consumers in {prec}: {why}", flush=True)
    for model in args.models.split(","):
        mbs, ga, steps = DEFAULT_BATCH[model]
        c = bench_config(model, precision=prec, zero_stage=2, micro_batch_size=mbs, grad_accum_steps=ga)
        seed_all(c.train.seed)
        step = arms.LargelmStep(c, Cycle(real_batches(c, 8)))
        step()
        consumers[f"{model} {prec}"] = (step, steps, mbs * ga * c.model.seq_length)

    loader_tps = {w: [] for w in WORKERS}
    train_tps = {k: [] for k in consumers}
    for r in range(reps):
        for w in WORKERS:
            t0 = time.perf_counter()
            for _ in range(nbatches):
                next(iters[w])
            loader_tps[w].append(nbatches * mb * seq / (time.perf_counter() - t0))
        for name, (step, steps, tokens) in consumers.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            train_tps[name].append(steps * tokens / (time.perf_counter() - t0))
        print(f"[P4] rep {r + 1}/{reps}: " + ", ".join(f"loader w={w} {loader_tps[w][-1]:,.0f}" for w in WORKERS)
              + ", " + ", ".join(f"train {k} {v[-1]:,.0f}" for k, v in train_tps.items()) + " tokens/s", flush=True)
    for it in iters.values():  # stop the DataLoader workers now (TokenLoader's finally); left to the garbage
        it.close()             # collector at exit, the workers kept the interpreter waiting for them forever
    del consumers, iters, it
    gc.collect()
    worst_consumer = max(train_tps, key=lambda k: stats(train_tps[k])["median"])  # the fastest consumer
    ratios = {w: {k: ratio_stats(loader_tps[w], v) for k, v in train_tps.items()} for w in WORKERS}
    shards = os.path.relpath(d.train[0].path, REPO)
    meta["config"] = {"seq_length": seq, "micro_batch_size": mb, "shuffle_buffer": d.shuffle_buffer,
                      "loader_batches_per_rep": nbatches, "shards": shards,
                      "training_precision": {"requested": "auto", "computed": prec, "reason": why}}
    finish_metadata(meta)
    data = {"meta": meta, "target": TARGET, "target_text": "loader tokens/s >= 20 x training tokens/s",
            "headline": {"value": min(ratios[w][worst_consumer]["median"] for w in (1, 2)),
                         "case": f"min over 1 and 2 workers vs {worst_consumer} training"},
            "loader_tokens_per_s": {str(w): stats(v) for w, v in loader_tps.items()},
            "training_tokens_per_s": {k: stats(v) for k, v in train_tps.items()},
            "ratios": {str(w): v for w, v in ratios.items()}}
    rows = []
    for w in WORKERS:
        rows.append([f"{w} worker{'s' if w != 1 else ''}" + (" (main process, reference)" if w == 0 else ""),
                     fmt_spread(data["loader_tokens_per_s"][str(w)]),
                     *(fmt_spread(ratios[w][k]) for k in train_tps),
                     verdict(ratios[w][worst_consumer]["median"], TARGET, True) if w else "-"])
    train_rows = [[k, fmt_spread(stats(v))] for k, v in train_tps.items()]
    md = f"""# P4: data path - loader alone vs training consumption

largelm's training loader (webdataset shards of `{shards}`, seq_length {seq}, batch {mb}, shuffle buffer
{d.shuffle_buffer}, checksum-verified, rank 0 of 1) read with no model, vs tokens/s largelm's training step
consumes (1 process, all cores, batches in memory; in {prec}, what `precision: auto` - as shipped - computes in on
this machine). Median [IQR] (min-max), {reps} interleaved repetitions of
{nbatches} loader batches. Target: loader >= {TARGET:.0f} x training.

Training consumption (tokens/s):

{md_table(["training", "tokens/s"], train_rows)}

Loader:

{md_table(["DataLoader workers", "loader tokens/s", *(f"x {k} training" for k in train_tps),
           f"target (vs {worst_consumer})"], rows)}
"""
    write_result(NAME, data, md, plot="P4", meta=meta)
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.5, 3.6))
    labels = [f"loader, {w} workers" for w in WORKERS] + [f"training\n{k}" for k in train_tps]
    st = [data["loader_tokens_per_s"][str(w)] for w in WORKERS] + [data["training_tokens_per_s"][k] for k in train_tps]
    colors = ["tab:blue"] * len(WORKERS) + ["tab:orange"] * len(train_tps)
    ax.bar(range(len(st)), [s["median"] for s in st], color=colors,
           yerr=[[s["median"] - s["q1"] for s in st], [s["q3"] - s["median"] for s in st]], capsize=3)
    need = TARGET * data["training_tokens_per_s"][worst_consumer]["median"]
    ax.axhline(need, ls="--", color="gray", lw=1, label=f"target: {TARGET:.0f} x {worst_consumer} training")
    ax.set_xticks(range(len(st)), labels, fontsize=7)
    ax.set_yscale("log")
    save_plot(fig, NAME, ax, ylabel="tokens/s (median, IQR)",
              title=f"P4: loader vs training consumption (target {TARGET:.0f}x)", legend=dict(fontsize=7))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

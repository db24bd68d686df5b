"""P4 for remote sources: tokens/s the loader delivers reading the training shards over loopback HTTP, HTTPS and
S3 vs the same shards on local disk, vs tokens/s training consumes.

The loader is ``largelm.data.build_loader`` as the trainer builds it (shuffle buffer and seed of
configs/gpt-tiny.yaml, sha256-verified shards, rank 0 of 1, the default remote settings: 8 MiB ranged GETs, no
cache, so every shard is downloaded again in every epoch), with 1 and 2 DataLoader workers, iterated by the main
process with no model. Sources, all on 127.0.0.1:

* ``local``: the shard directory;
* ``http`` / ``https``: the test suite's static file server with Range support (``tests/fault_http_server.py``, a
  Python ThreadingHTTPServer; HTTPS with a certificate from a private CA made here, verified through
  ``data.remote_ca_file``);
* ``s3``: moto's standalone S3 server (``python -m moto.server``) holding a copy of the shards.

The servers are single Python processes sharing the machine's cores with the loader workers and the benchmark, so
the remote figures are a lower bound for what the client side can do against a real object store or CDN (and
loopback has no network latency or bandwidth limit: a real network adds its own, which prefetch of the next shard
hides as long as one shard downloads faster than the previous one is read).

Training: largelm's step (``DenseStep``, 1 process, all cores, batches in memory, ``precision: auto`` as shipped)
for gpt-tiny, the fastest consumer and so the worst case for the ratio. Blocks interleaved in one process (each
repetition starts with the next loader arm, so none is always first);
per-repetition ratio loader tokens/s / training tokens/s. Target: >= 20x.

    python bench/p4_remote.py [--quick]
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import tempfile
import time
from pathlib import Path

from common import (
    DEFAULT_BATCH,
    TINY,
    Cycle,
    bench_config,
    real_batches,
    seed_all,
    shipped_precision,
    sync,
)
from p4_data import loader_bench_setup
from report import (
    REPO,
    RESULTS,
    finish_metadata,
    fmt_num,
    fmt_spread,
    md_table,
    plt,
    ratio_stats,
    save_plot,
    stats,
    verdict,
    write_result,
)

TARGET = 20.0
NAME = "p4_data_remote"
WORKERS = (1, 2)
SOURCES = ("local", "http", "https", "s3")


def start_sources(train_dir: Path, work: Path) -> tuple[dict, list, str]:
    """The shard split at every source: ``({source: location}, [server stop functions], ca file)``. Sets the AWS_*
    variables (endpoint and keys of moto) in this process before any loader forks its workers."""
    from remote_servers import FaultServer, MotoS3, make_tls

    tls = make_tls(work / "tls")
    http = FaultServer(work / "http", root=train_dir.parent)
    https = FaultServer(work / "https", root=train_dir.parent, tls=tls)
    moto = MotoS3(work / "moto")
    s3 = moto.upload_dir(train_dir, "bench", "train")
    os.environ.update(moto.env)
    sources = {"local": train_dir, "http": http.url(train_dir.name), "https": https.url(train_dir.name), "s3": s3}
    return sources, [http.kill, https.kill, moto.stop], str(tls.ca)


def quiet_training_figure(consumer: str):
    """(median training tokens/s, load averages, date) of ``consumer`` in bench/results/p4_data.json, if there."""
    path = RESULTS / "p4_data.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    figure = data.get("training_tokens_per_s", {}).get(consumer)
    if figure is None:
        return None
    meta = data["meta"]
    return figure["median"], f"{meta.get('load_avg_1min_at_start')}/{meta.get('load_avg_1min_at_end')}", \
        meta.get("date", "?")[:10]


def main(argv=None) -> int:
    args, meta, reps, nbatches, cfg = loader_bench_setup(__doc__, argv)

    import arms

    from largelm.data import build_loader, remote_settings

    d = cfg.data
    seq, mb = cfg.model.seq_length, cfg.train.micro_batch_size
    work = Path(tempfile.mkdtemp(prefix="p4-remote-"))
    locations, servers, ca_file = start_sources(Path(d.train[0].path), work)
    settings = dataclasses.replace(remote_settings(d), ca_file=ca_file)
    loaders, iters = {}, {}
    try:
        for source, location in locations.items():
            for w in WORKERS:
                loader = build_loader([location], seq_length=seq, batch_size=mb, num_workers=w,
                                      shuffle_buffer=d.shuffle_buffer, seed=d.seed, infinite=True, remote=settings)
                it = iter(loader)
                for _ in range(20):  # worker start-up, first shards downloaded and verified
                    next(it)
                loaders[source, w], iters[source, w] = loader, it

        prec, why = shipped_precision()
        mbs, ga, steps = DEFAULT_BATCH[TINY]
        c = bench_config(TINY, precision=prec, zero_stage=2, micro_batch_size=mbs, grad_accum_steps=ga)
        seed_all(c.train.seed)
        step = arms.LargelmStep(c, Cycle(real_batches(c, 8)))
        step()
        consumer, step_tokens = f"{TINY} {prec}", mbs * ga * c.model.seq_length

        loader_tps = {k: [] for k in iters}
        train_tps = []
        arms_order = list(iters)
        for r in range(reps):
            shift = r % len(arms_order)  # each repetition starts with another arm: no source always goes first
            for key in arms_order[shift:] + arms_order[:shift]:
                it = iters[key]
                t0 = time.perf_counter()
                for _ in range(nbatches):
                    next(it)
                loader_tps[key].append(nbatches * mb * seq / (time.perf_counter() - t0))
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            train_tps.append(steps * step_tokens / (time.perf_counter() - t0))
            print(f"[P4 remote] rep {r + 1}/{reps}: " + ", ".join(
                f"{s} w={w} {v[-1]:,.0f}" for (s, w), v in loader_tps.items()) + f", train {consumer} "
                f"{train_tps[-1]:,.0f} tokens/s", flush=True)
        retries = {f"{s} w={w}": loaders[s, w].retries for s, w in loaders}
        for it in iters.values():  # stop the DataLoader workers now (TokenLoader's finally)
            it.close()
        del step, iters, it
        gc.collect()
    finally:
        for stop in servers:
            stop()

    ratios = {k: ratio_stats(v, train_tps) for k, v in loader_tps.items()}
    vs_local = {k: ratio_stats(v, loader_tps["local", k[1]]) for k, v in loader_tps.items()}
    shards = os.path.relpath(d.train[0].path, REPO)
    meta["config"] = {"seq_length": seq, "micro_batch_size": mb, "shuffle_buffer": d.shuffle_buffer,
                      "loader_batches_per_rep": nbatches, "shards": shards, "chunk_bytes": settings.chunk_bytes,
                      "cache_dir": None, "training_precision": {"requested": "auto", "computed": prec, "reason": why}}
    finish_metadata(meta)
    key = lambda s, w: f"{s} w={w}"  # noqa: E731
    data = {"meta": meta, "target": TARGET, "target_text": "loader tokens/s >= 20 x training tokens/s",
            "headline": {"value": min(ratios[s, w]["median"] for s in SOURCES for w in WORKERS),
                         "case": f"min over sources and 1/2 workers vs {consumer} training"},
            "loader_tokens_per_s": {key(s, w): stats(v) for (s, w), v in loader_tps.items()},
            "training_tokens_per_s": {consumer: stats(train_tps)},
            "ratios": {key(s, w): v for (s, w), v in ratios.items()},
            "vs_local": {key(s, w): v for (s, w), v in vs_local.items()},
            "retries": retries}
    rows = [[s, w, fmt_spread(data["loader_tokens_per_s"][key(s, w)]), fmt_spread(vs_local[s, w]),
             fmt_spread(ratios[s, w]), verdict(ratios[s, w]["median"], TARGET, True)]
            for s in SOURCES for w in WORKERS]
    slowest = min(stats(v)["median"] for (s, _), v in loader_tps.items() if s != "local")
    held = {s: all(ratios[s, w]["median"] >= TARGET for w in WORKERS) for s in SOURCES}
    summary = "; ".join(f"{s}: {'holds' if ok else '**does not hold**'}" for s, ok in held.items())
    quiet = quiet_training_figure(consumer)
    cross = "" if quiet is None else (
        f"\nCross-check against another run (not a side-by-side ratio): `p4_data.md` measured {consumer} training "
        f"at {fmt_num(quiet[0])} tokens/s (1-min load at start/end {quiet[1]}, {quiet[2]}); the slowest remote "
        f"loader median here ({fmt_num(slowest)} tokens/s) is {fmt_num(slowest / quiet[0])}x that: a pessimistic "
        "bound when this run's load average (below) is higher, since the loader here is slowed by the load and the "
        "training there was not. Training slows more under load than the loader (it wants every core), so the "
        "side-by-side ratios of a loaded run are optimistic.\n")
    loads = [meta.get("load_avg_1min_at_start", 0.0), meta.get("load_avg_1min_at_end", 0.0)]
    busy = "" if max(loads) <= 1.5 * (os.cpu_count() or 1) else (
        f"\n**This run's machine was busy (1-min load average {loads[0]}/{loads[1]} on {os.cpu_count()} cores, other "
        "jobs included): every absolute figure is depressed, the side-by-side ratios to training are optimistic and "
        "the per-source differences are mostly noise; see the cross-check below.**\n")
    md = f"""# P4 for remote sources: loader over loopback HTTP, HTTPS and S3 vs local disk vs training consumption

largelm's training loader (shards of `{shards}`, seq_length {seq}, batch {mb}, shuffle buffer {d.shuffle_buffer},
checksum-verified, rank 0 of 1, default remote settings: {settings.chunk_bytes >> 20} MiB ranged GETs, no cache:
every shard downloaded again each epoch) reading the same shards from local disk, from a static HTTP and HTTPS
server (`tests/fault_http_server.py`, certificate verified through `data.remote_ca_file`) and from moto's S3
server, all on 127.0.0.1, vs tokens/s largelm's training step consumes ({consumer}: 1 process, all cores, batches
in memory; the fastest consumer, so the worst case). Median [IQR] (min-max), {reps} interleaved repetitions of
{nbatches} loader batches. Target: loader >= {TARGET:.0f} x training.

**>= {TARGET:.0f}x target (both worker counts): {summary}.**
{busy}
The servers are Python processes on the same {os.cpu_count()} cores as the loader workers and the benchmark:
the remote rows are a lower bound for the client against a real server, and loopback has no network latency or
bandwidth limit (a real network's is hidden by the prefetch of the next shard while one shard downloads faster
than the previous one is read). Retries during the run: {sum(retries.values())}.
{cross}
Training consumption: {consumer} {fmt_spread(stats(train_tps))} tokens/s.

{md_table(["source", "DataLoader workers", "loader tokens/s", "x local (same workers)", f"x {consumer} training",
           "target"], rows)}
"""
    write_result(NAME, data, md, plot="P4 remote", meta=meta)
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7.5, 3.6))
    keys = [(s, w) for s in SOURCES for w in WORKERS]
    st = [data["loader_tokens_per_s"][key(s, w)] for s, w in keys] + [data["training_tokens_per_s"][consumer]]
    labels = [f"{s}\n{w} worker{'s' if w > 1 else ''}" for s, w in keys] + [f"training\n{consumer}"]
    colors = ["tab:blue" if s == "local" else "tab:green" for s, _ in keys] + ["tab:orange"]
    ax.bar(range(len(st)), [s["median"] for s in st], color=colors,
           yerr=[[s["median"] - s["q1"] for s in st], [s["q3"] - s["median"] for s in st]], capsize=3)
    ax.axhline(TARGET * stats(train_tps)["median"], ls="--", color="gray", lw=1,
               label=f"target: {TARGET:.0f} x {consumer} training")
    ax.set_xticks(range(len(st)), labels, fontsize=7)
    ax.set_yscale("log")
    save_plot(fig, NAME, ax, ylabel="tokens/s (median, IQR)",
              title=f"P4: loader over loopback HTTP(S)/S3 vs local vs training (target {TARGET:.0f}x)",
              legend=dict(fontsize=7))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

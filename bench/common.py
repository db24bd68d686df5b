"""Shared pieces of the benchmarks: run metadata, timing statistics, configs, batches, result files.

Every benchmark script writes ``bench/results/<name>.json`` (all numbers, plus ``meta``: machine, versions,
config, date) and ``bench/results/<name>.md`` (the same as markdown tables), and usually a PNG plot.
``bench/summary.py`` collects the JSON files into ``bench/results/summary.md``.

Timing rules (the issue's): figures are ratios of arms measured side by side in the same process, repetitions
interleaved (arm A, arm B, arm A, arm B, ...) so drifting machine load hits every arm alike; each repetition
times a block of whole optimizer steps after warm-up; we report the median and the spread (IQR and min/max).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = Path(os.environ.get("LARGELM_BENCH_RESULTS", BENCH / "results"))
DATA = Path(os.environ.get("LARGELM_BENCH_DATA", REPO / "data" / "default"))

for _p in (str(REPO), str(REPO / "tests")):  # largelm itself, and tests/reference_gpt.py (the plain GPT)
    if _p not in sys.path:
        sys.path.insert(0, _p)

def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if not os.environ.get("DS_ACCELERATOR") and not _cuda():
    os.environ["DS_ACCELERATOR"] = "cpu"

# --- what is measured ----------------------------------------------------------------------------------

TINY = "gpt-tiny"  # configs/gpt-tiny.yaml: the quickstart model (h=128, 4 layers, ~0.6M params + 0.5M embedding)
SMALL = "gpt-25m"  # ~25M-parameter GPT (MFU); same family, h=512, 8 layers, 8 heads
MODEL_SHAPES = {
    TINY: {},  # as in the config file
    SMALL: {"num_layers": 8, "hidden_size": 512, "num_attention_heads": 8},
    # for GPU runs (bench/README.md): GPT-2 small / XL-like shapes on the same tokenizer and shards
    "gpt-125m": {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12},
    "gpt-1.3b": {"num_layers": 24, "hidden_size": 2048, "num_attention_heads": 16},
}


def bench_config(model: str = TINY, *, precision: str = "fp32", zero_stage: int = 2, micro_batch_size: int = 8,
                 grad_accum_steps: int = 2, steps: int = 1000, data: Path = DATA, **overrides):
    """A validated largelm Config: configs/gpt-tiny.yaml with the benchmark's model shape, precision, ZeRO stage
    and batch, pointed at ``data`` (``data/default`` unless LARGELM_BENCH_DATA says otherwise)."""
    import yaml

    from largelm.config import config_from_dict

    raw = yaml.safe_load((REPO / "configs" / "gpt-tiny.yaml").read_text())
    raw["name"] = f"bench-{model}"
    raw["model"].update(MODEL_SHAPES[model])
    if os.environ.get("LARGELM_BENCH_SEQ"):  # must match the shards' seq_length (LARGELM_BENCH_DATA)
        raw["model"]["seq_length"] = int(os.environ["LARGELM_BENCH_SEQ"])
    raw["tokenizer"]["model"] = str(data / "tokenizer" / "spm.model")
    raw["data"]["train"] = [{"path": str(data / "shards" / "train")}]
    raw["data"]["valid"] = [{"path": str(data / "shards" / "valid")}]
    raw["parallel"]["zero_stage"] = zero_stage
    raw["train"].update(precision=precision, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                        steps=steps)
    raw["optimizer"]["warmup_steps"] = min(raw["optimizer"]["warmup_steps"], steps)
    for key, value in overrides.items():  # "section.field": value
        section, field = key.split(".")
        raw.setdefault(section, {})[field] = value
    cfg = config_from_dict(raw, source=f"bench:{model}")
    if cfg.model.vocab_size is None:
        from largelm.tokenizer import Tokenizer

        cfg.model.vocab_size = Tokenizer.load(cfg.tokenizer.model).vocab_size
    return cfg


# default batch per model for the 1-process benchmarks: (micro-batch, grad-accum steps, steps per repetition)
DEFAULT_BATCH = {TINY: (8, 2, 3), SMALL: (8, 1, 1), "gpt-125m": (8, 1, 1), "gpt-1.3b": (4, 1, 1)}


def add_case_args(p, models: str, precisions: str = "fp32,bf16", reps: int = 9) -> None:
    """Options shared by the 1-process benchmarks (defaults: what run_all.sh measures on a CPU)."""
    p.add_argument("--models", default=models, help=f"comma-separated, from {', '.join(MODEL_SHAPES)}")
    p.add_argument("--precisions", default=precisions)
    p.add_argument("--micro-batch", type=int, default=None, help="default: per model (DEFAULT_BATCH)")
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--steps-per-rep", type=int, default=None, help="optimizer steps timed per repetition")
    p.add_argument("--reps", type=int, default=reps, help="interleaved repetitions (larger models: 2 fewer)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 repetitions, first model only")


def cases_from_args(args) -> list[dict]:
    models = args.models.split(",")
    if args.quick:
        models = models[:1]
    out = []
    for model in models:
        if model not in MODEL_SHAPES:
            raise SystemExit(f"unknown model {model!r}; choose from {', '.join(MODEL_SHAPES)}")
        mb, ga, steps = DEFAULT_BATCH[model]
        reps = 3 if args.quick else (args.reps if model == TINY else max(3, args.reps - 2))
        for precision in args.precisions.split(","):
            out.append({"model": model, "precision": precision, "mb": args.micro_batch or mb,
                        "ga": args.grad_accum or ga, "steps": args.steps_per_rep or steps, "reps": reps})
    return out


def run_cases(args, run_case: Callable[..., dict]) -> tuple[dict, list[dict]]:
    """The 1-process case benchmarks' run: one rank, ``run_case(model, precision, mb, ga, reps, steps)`` for every
    case of ``cases_from_args(args)``, the cases named in ``meta["configs"]``. Returns ``(meta, results)``, meta
    finished (``finish_metadata``)."""
    init_single_rank(args.threads)
    meta = run_metadata()
    results = [run_case(c["model"], c["precision"], c["mb"], c["ga"], c["reps"], c["steps"])
               for c in cases_from_args(args)]
    meta["configs"] = [f"{r['model']} {r['precision']} ZeRO-{r['config']['zero_stage']} (engine "
                       f"ZeRO-{r['config']['engine_zero_stage']}) "
                       f"mb{r['config']['micro_batch_size']}x{r['config']['grad_accum_steps']}" for r in results]
    finish_metadata(meta)
    return meta, results


def run_case_benchmark(argv, description: str, run_case: Callable[..., dict], models: str) -> tuple[dict, list[dict]]:
    """A 1-process case benchmark's ``main``: its options (``add_case_args``, ``models`` the default) parsed from
    ``argv``, then ``run_cases``."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_args(p, models=models)
    return run_cases(p.parse_args(argv), run_case)


def config_summary(cfg, world_size: int = 1) -> dict:
    """The case's shape and run settings; ``engine_zero_stage`` is the stage DeepSpeed runs at ``world_size``."""
    from largelm.model.flops import flops_per_token, matmul_parameter_count
    from largelm.parallel.deepspeed_config import engine_zero_stage

    m, t = cfg.model, cfg.train
    return {
        "model": {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "heads": m.num_attention_heads,
                  "ffn": m.ffn_size, "seq_length": m.seq_length, "vocab": m.padded_vocab_size(),
                  "tie_embeddings": m.tie_embeddings, "style": m.style},
        "matmul_params": matmul_parameter_count(m),
        "flops_per_token": flops_per_token(m),
        "precision": t.precision, "zero_stage": cfg.parallel.zero_stage,
        "engine_zero_stage": engine_zero_stage(cfg, world_size),
        "micro_batch_size": t.micro_batch_size, "grad_accum_steps": t.grad_accum_steps,
        "tokens_per_step_per_rank": t.micro_batch_size * t.grad_accum_steps * m.seq_length,
    }


# --- run metadata ----------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return "not installed"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata(**extra) -> dict:
    import torch

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "load_avg_1min_at_start": round(load, 2),
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("torch", "deepspeed", "megatron-core", "transformers", "webdataset")},
        "largelm_commit": _git_commit(),
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    meta.update(extra)
    return meta


def finish_metadata(meta: dict) -> dict:
    """Record the load average at the end too: a busy machine makes the absolute timings (not the ratios) moot."""
    try:
        meta["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return meta


def meta_markdown(meta: dict, machine_only: bool = False) -> str:
    v = meta["versions"]
    lines = [
        f"- date: {meta['date']}; host `{meta['host']}`; git `{meta['largelm_commit']}`",
        f"- machine: {meta['cpu']}, {meta['cores']} cores, {meta['memory_gib']} GiB, GPU: {meta['gpu']}",
        f"- versions: python {meta['python']}, torch {v['torch']}, deepspeed {v['deepspeed']}, megatron-core "
        f"{v['megatron-core']}, transformers {v['transformers']}, webdataset {v['webdataset']}",
    ]
    if machine_only:
        return "\n".join(lines[1:3])
    lines.append(f"- 1-min load average at start/end: {meta['load_avg_1min_at_start']}/"
                 f"{meta.get('load_avg_1min_at_end', '?')} (2 = this benchmark alone on 2 cores)")
    lines.append(f"- command: `{meta['command']}`; torch threads: {meta['torch_threads']}; environment: "
                 + ", ".join(f"{k}={v}" for k, v in meta.get("env", {}).items()))
    for key in ("config", "configs"):
        if key in meta:
            lines.append(f"- {key}: `{json.dumps(meta[key], sort_keys=False)}`")
    return "\n".join(lines)


# --- statistics --------------------------------------------------------------------------------------------


def stats(values: list[float]) -> dict:
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return {"n": 0}
    if n >= 4:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1, q3 = xs[0], xs[-1]
    return {"n": n, "median": statistics.median(xs), "q1": q1, "q3": q3, "min": xs[0], "max": xs[-1],
            "values": values}


def ratio_stats(num: list[float], den: list[float]) -> dict:
    """Per-repetition ratios num[i]/den[i] (each pair measured back to back), summarised."""
    return stats([a / b for a, b in zip(num, den)])


def fmt_num(x: float) -> str:
    """3 significant digits, never in exponent notation below 1e7 (1234.5 -> '1235', 0.012345 -> '0.0123')."""
    if x != x:  # nan
        return "nan"
    ax = abs(x)
    if ax == 0:
        return "0"
    if ax < 0.01:
        return "<0.01"
    if ax >= 100:
        return f"{x:,.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    if ax >= 0.1:
        return f"{x:.3f}"
    return f"{x:.3g}"


def fmt_spread(s: dict, scale: float = 1.0) -> str:
    """'median [q1, q3] (min-max)'."""
    f = lambda key: fmt_num(s[key] * scale)  # noqa: E731
    return f"{f('median')} [{f('q1')}, {f('q3')}] ({f('min')}-{f('max')})"


def device():
    from largelm.parallel import groups

    return groups.device()


def sync() -> None:
    """Wait for queued GPU work (a no-op on CPU) so a timer sees finished steps."""
    if _cuda():
        import torch

        torch.cuda.synchronize()


def interleaved(arms: dict[str, Callable[[], object]], reps: int, steps_per_rep: int, warmup: int = 2,
                label: str = "") -> dict[str, list[float]]:
    """Time ``arms`` alternately: after ``warmup`` steps of each, ``reps`` rounds, each round running
    ``steps_per_rep`` steps of every arm in turn (the order rotates each round). Returns seconds per step."""
    names = list(arms)
    for name in names:
        for _ in range(warmup):
            arms[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync()
            t0 = time.perf_counter()
            for _ in range(steps_per_rep):
                arms[name]()
            sync()
            times[name].append((time.perf_counter() - t0) / steps_per_rep)
        if label:
            done = ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names)
            print(f"[{label}] rep {r + 1}/{reps}: {done}", flush=True)
    return times


# --- process group for one in-process rank -------------------------------------------------------------------


def matmul_flops(dtype, n: int, seconds: float) -> float:
    """FLOP/s of repeated n x n x n matmuls for about ``seconds`` (after one warm-up product)."""
    import torch

    a = torch.randn(n, n, device=device()).to(dtype)
    b = torch.randn(n, n, device=device()).to(dtype)
    torch.matmul(a, b)
    sync()
    iters, t0 = 0, time.perf_counter()
    while True:
        for _ in range(10 if a.is_cuda else 1):
            torch.matmul(a, b)
            iters += 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and iters >= 3:
            return 2 * n**3 * iters / elapsed


def default_peak_sizes() -> tuple:
    """Matmul sizes n whose best n x n x n rate is the measured peak: large enough to saturate the device."""
    return (4096, 8192) if device().type == "cuda" else (1024, 2048)


def measured_peak(dtype, sizes: tuple, seconds: float, reps: int = 3) -> float:
    """The best over ``sizes`` of the median of ``reps`` matmul-rate measurements (FLOP/s)."""
    return max(statistics.median(matmul_flops(dtype, n, seconds) for _ in range(reps)) for n in sizes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV_KEYS = ("OMP_NUM_THREADS", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES")


def use_rank_environment() -> None:
    """Re-execute this script (once) under the environment ``largelm-launch --nproc 1`` gives a rank on this machine
    (``largelm.launch.cpu_environment``: thread count, DS_ACCELERATOR, glibc malloc settings), so an in-process
    benchmark measures what a launched run gets. Every arm in the process shares it. No-op on GPU."""
    if _cuda() or os.environ.get("LARGELM_BENCH_RANK_ENV"):
        return
    from largelm.launch import cpu_environment

    env = cpu_environment(os.environ, nproc=1)
    env["LARGELM_BENCH_RANK_ENV"] = "1"
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def init_single_rank(threads: Optional[int] = None) -> None:
    """World of one rank (what ``largelm-launch --nproc 1`` gives a rank: gloo on CPU, nccl on GPU) plus megatron
    parallel_state. ``threads``: torch intra-op threads (default: all cores, as the launcher gives one rank)."""
    import torch

    from largelm.parallel import groups

    use_rank_environment()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    groups.init_distributed()
    groups.init_model_parallel(1, 1)


def seed_all(seed: int) -> None:
    import torch

    from largelm.parallel.cpu_compat import model_parallel_manual_seed

    torch.manual_seed(seed)
    model_parallel_manual_seed(seed)


def real_batches(cfg, count: int, seed: int = 1234) -> list:
    """``count`` micro-batches ``[micro_batch_size, seq_length + 1]`` read by largelm's loader from the training
    shards (in-process, no workers). Every arm of a benchmark consumes this same list in the same order."""
    from largelm.data import build_loader

    loader = build_loader([(s.path, s.weight) for s in cfg.data.train], seq_length=cfg.model.seq_length,
                          batch_size=cfg.train.micro_batch_size, num_workers=0, shuffle_buffer=256, seed=seed)
    out = []
    for batch in loader:
        out.append(batch["tokens"])
        if len(out) == count:
            break
    return out


class Cycle:
    """Endless iterator over a fixed list of micro-batches (``{"tokens": ...}`` dicts, as the loader yields)."""

    def __init__(self, tokens: list):
        self.tokens, self.i = tokens, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        t = self.tokens[self.i % len(self.tokens)]
        self.i += 1
        return {"tokens": t}


# --- results -------------------------------------------------------------------------------------------------


def write_result(name: str, data: dict, markdown: str, *, plot: Optional[str] = None, meta: Optional[dict] = None,
                 run_notes: str = "") -> Path:
    """``results/<name>.json`` and ``results/<name>.md``. Build ``markdown`` after ``finish_metadata(meta)``.

    The page ends as every benchmark's does: with ``plot`` (its label), the image ``<name>.png`` (``save_plot``);
    with ``meta``, a "## Run" section (``meta_markdown``, then the lines of ``run_notes``)."""
    parts = [markdown.rstrip()]
    if plot is not None:
        parts.append(f"![{plot}]({name}.png)")
    if meta is not None:
        parts.append("\n".join(["## Run", meta_markdown(meta), *([run_notes.strip()] if run_notes.strip() else [])]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1, default=float) + "\n")
    path = RESULTS / f"{name}.md"
    path.write_text("\n\n".join(parts) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def save_plot(fig, name: str, ax=None, *, ylabel: Optional[str] = None, title: Optional[str] = None,
              legend: Optional[dict] = None) -> Path:
    """Finish a result plot and write ``results/<name>.png``: with ``ax``, its y label, title and legend
    (``legend``: keyword arguments, font size 8 unless given); then the layout."""
    if ax is not None:
        if ylabel is not None:
            ax.set_ylabel(ylabel)
        if title is not None:
            ax.set_title(title)
        ax.legend(**{"fontsize": 8, **(legend or {})})
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=120)
    return path


def grouped_bar_plot(name: str, results: list[dict], arms: list[str], stats_of: Callable[[dict, str], Optional[dict]],
                     ratio_of: Callable[[dict], float], *, ylabel: str, title: str, figsize: tuple = (7, 3.6),
                     margin: float = 0.15) -> Path:
    """The 1-process benchmarks' plot: one group of bars per case (``model precision``), one bar per arm at its
    median with IQR error bars (``stats_of(case, arm)``: a ``stats`` dict in plotted units, or None for an arm the
    case lacks), log y axis, and the case's ratio ``x<ratio_of(case)>`` written above the group."""
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=figsize)
    width = 0.8 / len(arms)
    nan = {"median": float("nan"), "q1": float("nan"), "q3": float("nan")}
    for i, arm in enumerate(arms):
        st = [stats_of(r, arm) or nan for r in results]
        ax.bar([x + (i - (len(arms) - 1) / 2) * width for x in range(len(results))], [s["median"] for s in st],
               width, yerr=[[s["median"] - s["q1"] for s in st], [s["q3"] - s["median"] for s in st]], label=arm,
               capsize=3)
    for x, r in enumerate(results):
        top = max(s["q3"] for s in (stats_of(r, arm) for arm in arms) if s is not None)
        ax.annotate(f"x{ratio_of(r):.2f}", (x, top), xytext=(0, 4), textcoords="offset points", ha="center",
                    fontsize=8)
    ax.set_xticks(range(len(results)), [f"{r['model']}\n{r['precision']}" for r in results])
    ax.set_yscale("log")
    ax.margins(y=margin)
    return save_plot(fig, name, ax, ylabel=ylabel, title=title)


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "**missed**"


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot

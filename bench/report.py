"""Where benchmark results go and how they read: run metadata, statistics, number formats, result pages, plots.

Every benchmark writes ``bench/results/<name>.json`` (all numbers, plus ``meta``: machine, versions, config, date)
and ``bench/results/<name>.md`` (the same as markdown tables), and usually a PNG plot. ``bench/summary.py`` collects
the JSON files into ``bench/results/summary.md``. No torch, DeepSpeed or megatron import at module level: the
summary and the launcher-driven benchmarks use this without building a model.
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
from pathlib import Path
from typing import Callable, Optional

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = Path(os.environ.get("LARGELM_BENCH_RESULTS", BENCH / "results"))
DATA = Path(os.environ.get("LARGELM_BENCH_DATA", REPO / "data" / "default"))
ENV_KEYS = ("OMP_NUM_THREADS", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "DS_ACCELERATOR", "CUDA_VISIBLE_DEVICES")
# what torch and oneDNN may use on this CPU: they decide whether bf16 is native (fast) or emulated (30-85x slower)
ISA_ENV_KEYS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


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
        # The result files a run rewrites (bench/results) do not make the measured code dirty.
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def compute_record() -> dict:
    """What this machine computes natively, as the run saw it: torch's CPU capability (the ATen kernels' ISA),
    ``largelm.hardware.detect_device()`` (which decides ``train.precision: auto``), the precision ``auto`` picks
    here, and the environment variables that limit the ISA (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``) if
    set. bf16 is ~3x fp32 on a CPU with AVX512_BF16/AMX and 30-85x slower on an AVX2-only one, so every figure
    involving bf16 - and every "as shipped" figure - depends on it."""
    import dataclasses

    import torch

    record: dict = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "env": {k: os.environ[k] for k in ISA_ENV_KEYS if k in os.environ}}
    try:
        from largelm.hardware import choose_precision, detect_device

        device = detect_device()
        record["device"] = dataclasses.asdict(device)
        record["auto_precision"] = choose_precision("auto", device).precision
    except Exception as e:  # noqa: BLE001 - the record must not stop a benchmark
        record["device"] = {"error": f"{type(e).__name__}: {e}"}
    return record


def compute_text(meta: dict) -> str:
    """One line of ``meta["compute"]`` for the pages' machine line and the summary's header."""
    c = meta.get("compute")
    if not c:
        return "CPU capability not recorded (run before the record existed)"
    d = c.get("device", {})
    if "native_bf16" in d:
        native = "native" if d["native_bf16"] else "not native"
        where = f"{d['type']} {d['capability']}: " if d["capability"] != c["torch_cpu_capability"] else ""
        text = (f"torch CPU capability {c['torch_cpu_capability']}; {where}bf16 {native} ({d['detail']}), so "
                f"`precision: auto` = {c.get('auto_precision', '?')}")
    else:
        text = f"torch CPU capability {c['torch_cpu_capability']}; device not detected ({d.get('error', '?')})"
    if c.get("env"):
        text += "; " + " ".join(f"{k}={v}" for k, v in c["env"].items())
    return text


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
        "compute": compute_record(),
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
        f"- machine: {meta['cpu']}, {meta['cores']} cores, {meta['memory_gib']} GiB, GPU: {meta['gpu']}; "
        f"{compute_text(meta)}",
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
    if meta.get("bf16_check", {}).get("run"):  # bf16 not native but cheap enough here (common.bf16_skip_reason)
        lines.append(f"- bf16 cases ran: {meta['bf16_check']['reason']}")
    for skip in meta.get("skipped", []):
        lines.append(f"- skipped: {skip['case']} - {skip['reason']}")
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

"""Shared pieces of the benchmarks that build and time models: configs, batches, the one-rank world, timing.

Timing rules (the issue's): figures are ratios of arms measured side by side in the same process, repetitions
interleaved (arm A, arm B, arm A, arm B, ...) so drifting machine load hits every arm alike; each repetition
times a block of whole optimizer steps after warm-up; we report the median and the spread (IQR and min/max).
Result files, run metadata and statistics: ``bench/report.py``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from report import DATA, REPO, finish_metadata, run_metadata

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
    p.add_argument("--precisions", default=precisions,
                   help="comma-separated fp32, bf16, auto (= what train.precision: auto picks here). bf16 cases are "
                        f"skipped, with the reason recorded, where bf16 is not native and not cheap ({BF16_POLICY_ENV}"
                        "=run to time them anyway)")
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
        for requested in args.precisions.split(","):
            precision = shipped_precision()[0] if requested == "auto" else requested
            if precision not in ("fp32", "bf16"):
                raise SystemExit(f"unknown precision {requested!r}; choose from fp32, bf16, auto")
            if any(c["model"] == model and c["precision"] == precision for c in out):
                continue
            out.append({"model": model, "precision": precision, "mb": args.micro_batch or mb,
                        "ga": args.grad_accum or ga, "steps": args.steps_per_rep or steps, "reps": reps})
    return out


def run_cases(args, run_case: Callable[..., dict], label: str) -> tuple[dict, list[dict]]:
    """The 1-process case benchmarks' run: one rank, ``run_case(model, precision, mb, ga, reps, steps)`` for every
    case of ``cases_from_args(args)`` that runs on this machine (``skip_reason``; the others are listed in
    ``meta["skipped"]``), the cases named in ``meta["configs"]``. Returns ``(meta, results)``, meta finished
    (``finish_metadata``)."""
    init_single_rank(args.threads)
    meta = run_metadata()
    results, skipped = [], []
    for c in cases_from_args(args):
        reason = skip_reason(c["precision"], c["model"])
        if reason:
            print(f"[{label} {c['model']} {c['precision']}] skipped: {reason}", flush=True)
            skipped.append({"case": f"{c['model']} {c['precision']}", "model": c["model"],
                            "precision": c["precision"], "reason": reason})
            continue
        results.append(run_case(c["model"], c["precision"], c["mb"], c["ga"], c["reps"], c["steps"]))
    record_skips(meta, skipped)
    if not results:
        raise SystemExit(f"{label}: no case runs on this machine: "
                         + "; ".join(f"{s['case']}: {s['reason']}" for s in skipped))
    meta["configs"] = [f"{r['model']} {r['precision']} ZeRO-{r['config']['zero_stage']} (engine "
                       f"ZeRO-{r['config']['engine_zero_stage']}) "
                       f"mb{r['config']['micro_batch_size']}x{r['config']['grad_accum_steps']}" for r in results]
    finish_metadata(meta)
    return meta, results


def run_case_benchmark(argv, description: str, run_case: Callable[..., dict], models: str, label: str
                       ) -> tuple[dict, list[dict]]:
    """A 1-process case benchmark's ``main``: its options (``add_case_args``, ``models`` the default) parsed from
    ``argv``, then ``run_cases`` (``label``: the log lines' prefix, e.g. "P1")."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_case_args(p, models=models)
    return run_cases(p.parse_args(argv), run_case, label)


def config_summary(cfg, world_size: int = 1) -> dict:
    """The case's shape and run settings; ``engine_zero_stage`` is the stage DeepSpeed runs at ``world_size``."""
    from largelm.hardware import run_precision
    from largelm.model.flops import flops_per_token, matmul_parameter_count
    from largelm.parallel.deepspeed_config import engine_zero_stage

    m, t = cfg.model, cfg.train
    return {
        "model": {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "heads": m.num_attention_heads,
                  "ffn": m.ffn_size, "seq_length": m.seq_length, "vocab": m.padded_vocab_size(),
                  "tie_embeddings": m.tie_embeddings, "style": m.style},
        "matmul_params": matmul_parameter_count(m),
        "flops_per_token": flops_per_token(m),
        # as computed; ``requested_precision`` is the config's setting (``auto`` is resolved on this machine)
        "precision": run_precision(cfg), "requested_precision": t.precision, "zero_stage": cfg.parallel.zero_stage,
        "engine_zero_stage": engine_zero_stage(cfg, world_size),
        "micro_batch_size": t.micro_batch_size, "grad_accum_steps": t.grad_accum_steps,
        "tokens_per_step_per_rank": t.micro_batch_size * t.grad_accum_steps * m.seq_length,
    }


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


# --- measured peak: the model's own matrix products (as the trainer's MFU) ---------------------------------------


def square_matmul_flops(dtype, n: int, seconds: float) -> float:
    """FLOP/s of repeated n x n x n matmuls for about ``seconds`` (after one warm-up product). Only P3's optional
    reference column (``--square-sizes``): the MFU peak is ``model_matmul_rates``."""
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


def model_matmul_rates(cfg, dtype, seconds_per_product: float = 0.05, tokens: Optional[int] = None,
                       raw: bool = False) -> dict:
    """FLOP/s of the model's own matrix products, as the trainer measures its MFU peak: every linear of
    ``largelm.model.flops.matmul_shapes`` (QKV, attention output, MLP in/out, logits) at the micro-batch's tokens
    (``tokens``: default micro_batch_size x seq_length) and the rank's TP split, each in the three layouts training
    runs (forward, input gradient, weight gradient), timed by ``largelm.train.metrics.matmul_flops``. Keyed
    ``"<product> <m>x<k>x<n>"`` (``raw``: metrics' ``(product, m, k, n)`` keys); the best value is the peak."""
    from largelm.model.flops import matmul_shapes
    from largelm.train.metrics import matmul_flops

    tokens = tokens or cfg.train.micro_batch_size * cfg.model.seq_length
    shapes = matmul_shapes(cfg.model, tokens, cfg.parallel.tensor_parallel)
    rates = matmul_flops(shapes, dtype, seconds_per_product, device=device())
    return rates if raw else {f"{name} {m}x{k}x{n}": rate for (name, m, k, n), rate in rates.items()}


def model_peak(cfg, dtype, seconds_per_product: float = 0.1, reps: int = 3) -> tuple[float, dict[str, float]]:
    """``(peak, rates)``: the median of ``reps`` measurements of each of the model's products
    (``model_matmul_rates``) and the best of those medians, the MFU denominator (as the trainer's)."""
    runs = [model_matmul_rates(cfg, dtype, seconds_per_product) for _ in range(reps)]
    rates = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    return max(rates.values()), rates


# --- precision: what largelm ships (``auto``) and when bf16 is worth timing here -------------------------------

BF16_CHEAP_SLOWDOWN = 3.0  # without native bf16, bf16 cases still run if the model's products are at most this slow
BF16_POLICY_ENV = "LARGELM_BENCH_EMULATED_BF16"  # probe (default) | run | skip: bf16 cases where bf16 is not native
BF16_CHECK: dict = {}  # the probe's outcome, recorded in the run's metadata (``meta["bf16_check"]``)


def shipped_precision() -> tuple[str, str]:
    """``(precision, reason)``: what ``train.precision: auto`` (every shipped config's setting) computes in on this
    machine for a fresh run (``largelm.hardware.choose_precision``)."""
    from largelm.hardware import choose_precision, detect_device

    choice = choose_precision("auto", detect_device())
    return choice.precision, choice.reason


def bf16_skip_reason(model: str = TINY) -> Optional[str]:
    """None if bf16 cases should run here, else why not (recorded with the skipped case). They run where bf16 is
    native (``largelm.hardware.detect_device``). Elsewhere a probe times the model's matrix products
    (``model_matmul_rates`` at 256 tokens, the shapes of ``model``) in bf16 and fp32, a few
    seconds even at emulated speed: bf16 cases run only if cheap, i.e. the products take at most
    ``BF16_CHEAP_SLOWDOWN`` x as long in bf16 (an AVX2-only CPU: 30-85x; they would take minutes). The environment
    variable LARGELM_BENCH_EMULATED_BF16=run or =skip overrides the probe. The first probe's outcome is reused."""
    import torch

    from largelm.hardware import detect_device
    from largelm.train.metrics import products_seconds

    dev = detect_device()
    if dev.native_bf16:
        return None
    policy = os.environ.get(BF16_POLICY_ENV, "probe")
    what = f"bf16 not native on this {'CPU' if dev.type == 'cpu' else 'GPU'}: {dev.detail}"
    if policy == "run":
        BF16_CHECK.update(native=False, run=True, reason=f"{what}; run anyway ({BF16_POLICY_ENV}=run)")
        return None
    if policy == "skip":
        BF16_CHECK.update(native=False, run=False, reason=f"{what} ({BF16_POLICY_ENV}=skip)")
        return BF16_CHECK["reason"]
    if "slowdown" not in BF16_CHECK:
        cfg = bench_config(model)
        times = {}
        for dtype in (torch.float32, torch.bfloat16):
            times[dtype] = products_seconds(model_matmul_rates(cfg, dtype, 0.02, tokens=256, raw=True))
        slowdown = times[torch.bfloat16] / times[torch.float32]
        cheap = slowdown <= BF16_CHEAP_SLOWDOWN
        BF16_CHECK.update(native=False, slowdown=round(slowdown, 2), run=cheap, reason=(
            f"{what}; the model's matrix products took {slowdown:.1f}x as long in bf16 as in fp32 here (probe; "
            f"bf16 cases run up to {BF16_CHEAP_SLOWDOWN:g}x)"))
        print(f"bf16 probe: {BF16_CHECK['reason']}", flush=True)
    return None if BF16_CHECK["run"] else BF16_CHECK["reason"]


def skip_reason(precision: str, model: str = TINY) -> Optional[str]:
    """Why a case of ``model`` in ``precision`` is not run on this machine (None: run it)."""
    return bf16_skip_reason(model) if precision == "bf16" else None


def record_skips(meta: dict, skipped: list[dict]) -> None:
    """Cases not run and why (``meta["skipped"]``: every result page lists them in its run record, the summary as
    rows), and the bf16 probe's outcome if one ran."""
    meta["skipped"] = skipped
    if BF16_CHECK:
        meta["bf16_check"] = dict(BF16_CHECK)


# --- process group for one in-process rank -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_training(cfg: Path, nproc: int, log: Path) -> tuple[str, float]:
    """One ``largelm-launch --config cfg --nproc N`` run (CPU ranks, a free master port): its output (also written
    to ``log``) and wall seconds; RuntimeError with the log's tail if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "largelm.launch", "--config", str(cfg), "--nproc", str(nproc),
                           "--master-port", str(free_port())],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"})
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"{cfg} failed (exit {proc.returncode}); log {log}:\n{proc.stdout[-3000:]}")
    return proc.stdout, time.perf_counter() - t0




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


def distill_bench_args(argv, description: str, *, teacher_steps: int, student_steps: int, eval_steps: int,
                       work_name: str, add_args: Optional[Callable] = None):
    """The options the distillation benchmarks share (teacher/student steps, alpha, T, eval batches, ranks, work
    directory; ``add_args(parser)`` adds a benchmark's own) -> (args, the work directory, created)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-steps", type=int, default=teacher_steps)
    p.add_argument("--student-steps", type=int, default=student_steps)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--eval-steps", type=int, default=eval_steps)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--work", default=str(REPO / "runs" / work_name))
    if add_args is not None:
        add_args(p)
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    return args, work


def distill_bench_metadata(args, **config) -> dict:
    """``run_metadata`` of a distillation benchmark: the shared options of ``distill_bench_args`` plus ``config``."""
    return run_metadata(config={
        "teacher_steps": args.teacher_steps, "student_steps": args.student_steps, "teacher_layers": 4, **config,
        "alpha": args.alpha, "temperature": args.temperature, "nproc": args.nproc, "data": str(DATA),
        "eval_steps": args.eval_steps, "precision": f"auto (= {shipped_precision()[0]} here)"})

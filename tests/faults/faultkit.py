"""Helpers for the fault-injection suite: run the real launcher (optionally killing it), read what a run left
behind (tensorboard scalars, checkpoint tensors), damage shards, mount a small tmpfs."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue
from typing import Callable, Optional

import yaml
from train_utils import REPO, free_port, tiny_config

from largelm.checkpoint.manager import Checkpoint, find_latest, verify_checkpoint

RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
SAVED = re.compile(r"saved checkpoint \S+step_(\d{8})")
STEP = re.compile(r"^step (\d+)/(\d+) loss", re.MULTILINE)


class RunConfig:
    """Writes the suite's tiny config: 2-layer GPT, fp32, ZeRO-2, dropout (RNG matters), 8 steps, a checkpoint
    every 2 steps, keep_last 2, MFU peak given (no start-up matmul benchmark)."""

    def __init__(self, tokenizer_path: Path, shard_dir: Path, seq_length: int):
        self.tokenizer_path, self.shard_dir, self.seq_length = tokenizer_path, shard_dir, seq_length

    def __call__(self, tmp: Path, **sections) -> Path:
        base = {
            "model": {"hidden_dropout": 0.1, "attention_dropout": 0.1},
            "train": {"steps": 8},
            "checkpoint": {"save_interval": 2, "keep_last": 2},
            "logging": {"peak_tflops_per_rank": 1.0},
        }
        for section, values in sections.items():
            base[section] = {**base.get(section, {}), **values}
        tmp.mkdir(parents=True, exist_ok=True)
        return tiny_config(tmp, self.tokenizer_path, self.shard_dir, self.seq_length, **base)


def edit_config(config: Path, **sections) -> Path:
    """Update sections of a written config in place (e.g. point the checkpoint dir elsewhere)."""
    data = yaml.safe_load(config.read_text())
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


@dataclass
class Result:
    returncode: int
    output: str
    seconds: float
    killed: bool = False
    killed_after: Optional[str] = None  # the output line that triggered the kill
    seconds_after_error: Optional[float] = None  # from the first "error" line to the exit of the whole job

    def check_ok(self) -> str:
        assert self.returncode == 0, f"run failed (exit {self.returncode}):\n{self.output[-6000:]}"
        return self.output

    @property
    def steps(self) -> list[int]:
        return [int(m.group(1)) for m in STEP.finditer(self.output)]

    @property
    def saved(self) -> list[int]:
        return [int(s) for s in SAVED.findall(self.output)]

    @property
    def resumed_at(self) -> Optional[int]:
        m = RESUMED.search(self.output)
        return int(m.group(2)) if m else None


def run(config: Path, overrides: tuple = (), faults: str = "", kill_when: Optional[Callable[[str], bool]] = None,
        timeout: float = 300, nproc: int = 2, on_line: Optional[Callable[[str, int], None]] = None) -> Result:
    """Run ``largelm-launch`` in its own process group. ``faults`` sets ``LARGELM_FAULTS``; ``kill_when(line)``
    returning True SIGKILLs the whole process group (launcher, ranks, data workers) at that output line;
    ``on_line(line, launcher_pid)`` sees every line (e.g. to signal one rank: ``descendant_ranks``)."""
    cmd = [sys.executable, "-m", "largelm.launch", "--config", str(config), "--nproc", str(nproc),
           "--master-port", str(free_port())]
    cmd += ["--", *overrides] if overrides else []
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.pop("LARGELM_FAULTS", None)
    if faults:
        env["LARGELM_FAULTS"] = faults
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    queue: Queue = Queue()
    reader = threading.Thread(target=lambda: ([queue.put(line) for line in proc.stdout], queue.put(None)),
                              daemon=True)
    reader.start()
    killed, killed_after, error_at = False, None, None
    try:
        while True:
            remaining = timeout - (time.monotonic() - start)
            try:
                line = queue.get(timeout=max(remaining, 0.01))
            except Empty:  # a hung job is a failure too: kill it and say so
                raise TimeoutError(f"run did not finish in {timeout}s:\n{''.join(lines)[-4000:]}") from None
            if line is None:
                break
            lines.append(line)
            if error_at is None and line.startswith("error"):
                error_at = time.monotonic()
            if on_line is not None:
                on_line(line, proc.pid)
            if kill_when is not None and not killed and kill_when(line):
                os.killpg(proc.pid, signal.SIGKILL)
                killed, killed_after = True, line.rstrip()
        proc.wait(timeout=30)
    finally:
        _reap_group(proc)
    end = time.monotonic()
    log = config.parent / f"launch-{time.strftime('%H%M%S')}-{proc.pid}.log"  # kept for debugging a failure
    log.write_text("".join(lines))
    return Result(proc.returncode, "".join(lines), end - start, killed, killed_after,
                  None if error_at is None else end - error_at)


def random_kill_step(lo: int, hi: int) -> tuple[int, int]:
    """(seed, step): a step in [lo, hi] drawn from ``LARGELM_FAULT_SEED`` (default: the clock), printed so that a
    failing draw can be replayed."""
    seed = int(os.environ.get("LARGELM_FAULT_SEED", time.time_ns() % 10**6))
    step = random.Random(seed).randint(lo, hi)
    print(f"SIGKILL after the line of step {step} (LARGELM_FAULT_SEED={seed})")
    return seed, step


def sigkill_then_resume(config: Path, kill_step: int, ckpt_root: Path,
                        resumed_tensorboard: Optional[Path] = None) -> Checkpoint:
    """SIGKILL the whole job of ``config`` after its line of ``kill_step``; the checkpoint a restart picks must be at
    least the last one the job said it saved and must verify; then run ``config`` again (``resumed_tensorboard``:
    log that run there, apart from the killed one's events), which must resume from it. Returns that checkpoint."""
    killed = run(config, kill_when=lambda line: line.startswith(f"step {kill_step}/"))
    assert killed.killed and killed.returncode == -9, killed.output[-3000:]
    latest = find_latest(ckpt_root)  # what a restart will pick: verified by checksum, partial dirs skipped
    assert latest is not None and latest.step >= max(killed.saved), (latest, killed.saved)
    verify_checkpoint(latest.path)
    if resumed_tensorboard is not None:
        edit_config(config, logging={"tensorboard_dir": str(resumed_tensorboard)})
    resumed = run(config)
    resumed.check_ok()
    assert resumed.resumed_at == latest.step, resumed.output[-3000:]
    return latest


def scalar_differences(got: dict[str, dict[int, float]], expected: dict[str, dict[int, float]], tags,
                       steps) -> list[str]:
    """The (tag, step) scalars of ``got`` that are missing or not bit-equal to ``expected``'s (``tb_scalars``)."""
    return [f"{tag} step {s}: {got.get(tag, {}).get(s)!r} vs {expected[tag][s]!r}" for tag in tags for s in steps
            if not bitwise_equal(got.get(tag, {}).get(s, float("nan")), expected[tag][s])]


def environ_of(pid: int) -> dict[str, str]:
    """A process's environment, from /proc (OSError if it is gone)."""
    return dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().decode(
        errors="replace").split("\0") if "=" in item)


def _process_table() -> dict[int, tuple[int, bytes, dict[str, str]]]:
    """{pid: (parent pid, cmdline, environment)} of every process /proc lets us read."""
    table = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                table[int(proc.name)] = (ppid, (proc / "cmdline").read_bytes(), environ_of(int(proc.name)))
    return table


def training_ranks(where: Callable[[int, dict[str, str]], bool],
                   table: Optional[dict[int, tuple[int, bytes, dict[str, str]]]] = None) -> dict[int, int]:
    """{RANK: pid} of the training ranks (``largelm.train.main`` processes, not their data workers: a worker's
    command line is its parent's) for which ``where(pid, environment)`` holds. The caller's predicate names the
    processes it started (below its launcher, or carrying its own mark): several "hosts" share this process table.
    ``table``: a ``_process_table()`` the caller already read (default: read it now)."""
    table = _process_table() if table is None else table
    ranks = {}
    for pid, (ppid, cmdline, env) in table.items():
        is_worker = ppid in table and table[ppid][1] == cmdline
        if b"largelm.train.main" in cmdline and "RANK" in env and not is_worker and where(pid, env):
            ranks[int(env["RANK"])] = pid
    return ranks


def descendant_ranks(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training ranks below the launcher process ``launcher_pid`` (ours: started by this test)."""
    table = _process_table()

    def below_launcher(pid: int, _env) -> bool:
        while pid in table and pid > 1:
            pid = table[pid][0]
            if pid == launcher_pid:
                return True
        return False
    return training_ranks(below_launcher, table)


def _reap_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Kill whatever is left of the run's process group (a test must not leave ranks behind) and wait until it is
    gone: a SIGKILLed rank inside a syscall (an fsync of its checkpoint) still exists for a while, holding the
    checkpoint directory's lock, and a restart in that window is rightly refused ("in use by another run")."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + timeout
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    """Does a process of group ``pgid`` still exist (zombies included: their parent, the launcher, is gone and
    pid 1 reaps them)?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# --- what a run leaves behind -------------------------------------------------------------------------------
def tb_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every event file under ``logdir`` (later files win on a repeated step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted(Path(logdir).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def checkpoint_state(step_dir: Path) -> dict[str, object]:
    """Every tensor and plain value in a checkpoint directory, flattened to ``file/key/key...`` (safe loads)."""
    import torch

    from largelm.parallel.deepspeed_compat import safe_torch_load

    flat: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, (dict, list, tuple, torch.Tensor)) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
        else:
            flat[prefix] = value

    for f in sorted(Path(step_dir).glob("*.pt")):
        walk(f.name, safe_torch_load(f))
    return flat


def carried_retries(ckpt_root: Path) -> int:
    """Remote retries recorded in the latest checkpoint under ``ckpt_root``: the ranks' loader states' counts, which
    a resumed run's tensorboard ``data/retries`` continues from (the merged ``data/global/retries`` not re-added)."""
    step_dir = Path(ckpt_root) / (Path(ckpt_root) / "latest").read_text().strip()
    return sum(int(v) for k, v in checkpoint_state(step_dir).items() if re.search(r"\.pt/data/retries$", k))


# Values that legitimately differ between two runs that trained identically.
_RUN_SPECIFIC = re.compile(r"/(ds_config|ds_version)(/|$)")


def state_differences(a_dir: Path, b_dir: Path) -> list[str]:
    """Keys whose values differ (tensors compared bitwise, dtype included) between two checkpoints."""
    import torch

    a, b = checkpoint_state(a_dir), checkpoint_state(b_dir)
    diffs = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        if _RUN_SPECIFIC.search(key):
            continue
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            same = _bits_equal(x, y)
        else:
            same = _plain_equal(x, y)
        if not same:
            diffs.append(key)
    return diffs


def _bits_equal(x, y) -> bool:
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN == NaN, unlike torch.equal)."""
    import torch

    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    x, y = x.detach().cpu().contiguous().reshape(-1), y.detach().cpu().contiguous().reshape(-1)
    return torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def _plain_equal(x, y) -> bool:
    if type(x) is type(y) and hasattr(x, "__dict__") and not isinstance(x, type):  # e.g. DeepSpeed's LossScaler
        return vars(x) == vars(y)
    try:
        return bool(x == y)
    except Exception:  # noqa: BLE001 - objects without a usable ==
        return repr(x) == repr(y)


def bitwise_equal(a: float, b: float) -> bool:
    import struct

    return struct.pack("<d", a) == struct.pack("<d", b)


# --- a small real filesystem ----------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(path: Path, size_bytes: int):
    """Mount a tmpfs of ``size_bytes`` at ``path`` (yields True), or yield False when mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(path)], check=True, capture_output=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --- damaging shards --------------------------------------------------------------------------------------------
def first_shards_read(split_dir: Path, seed: int, world_size: int = 2) -> list[tuple[str, int]]:
    """(shard path, first sample index) that each data-parallel rank reads first in epoch 0 (worker 0)."""
    from largelm.data.format import read_manifest
    from largelm.data.shards import epoch_shards, split_by_rank

    manifest = read_manifest(split_dir)
    order = epoch_shards(manifest, split_dir, epoch=0, seed=seed, dataset_index=0, shuffle=True)
    return [(r.path, r.start) for r in (split_by_rank(order, rank, world_size)[0] for rank in range(world_size))]


def rewrite_sample(shard: Path, index: int, payload: bytes) -> str:
    """Replace sample ``index`` of a tar shard by ``payload`` and make the manifest agree (size, sha256), so the
    per-sample check is what must catch it. Returns the sample's key."""
    import webdataset as wds

    from largelm.fileio import sha256_file

    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    key = samples[index]["__key__"]
    with wds.TarWriter(str(shard), mtime=0) as writer:
        for i, s in enumerate(samples):
            writer.write({"__key__": s["__key__"], "tokens.npy": payload if i == index else s["tokens.npy"]})
    manifest_path = shard.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for info in manifest["shards"]:
        if info["file"] == shard.name:
            info["sha256"], info["num_bytes"] = sha256_file(shard), shard.stat().st_size
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return key


# --- one in-process rank with a real engine (for tests that need DeepSpeed but not two processes) --------------
@contextlib.contextmanager
def single_rank_step(run_config: "RunConfig", tmp: Path, **sections):
    """Yields ``(cfg, step)``: a DenseStep (model + DeepSpeed engine) on a one-rank gloo world in this process."""
    from mp_utils import single_rank_parallel_state

    from largelm.config import load_config
    from largelm.train.preflight import preflight

    cfg = preflight(load_config(run_config(tmp, **sections)), world_size=1)
    saved = {k: os.environ.get(k) for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")  # DeepSpeed insists on LOCAL_RANK
    try:
        with single_rank_parallel_state():
            from largelm.parallel.cpu_compat import model_parallel_manual_seed
            from largelm.train.step import build_step

            model_parallel_manual_seed(cfg.train.seed)  # as the trainer does (dropout's RNG tracker)
            yield cfg, build_step(cfg, world_size=1)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class CodeExecutionPayload:
    """Unpickling this runs ``touch <marker>`` (what a malicious checkpoint or sample would carry)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- remote sources -----------------------------------------------------------------------------------------
REMOTE_FAULTS = [{"match": "train-00000", "kind": "500", "times": 2},
                 {"match": "train-00000", "kind": "drop", "times": 2}]


def remote_run_killed_and_resumed(server, config: Path, tmp_path: Path, reference: dict, scenario: dict) -> None:
    """The 2-rank fp32 fault-suite run on a remote source served through ``server`` (a tests/remote_servers
    FaultServer failing 2 requests with HTTP 500 and cutting 2 connections), SIGKILLed at step 5 and resumed with
    the faults again: every fault met is retried and counted (``data/retries`` goes on from the checkpoint's), and
    the resumed losses and the final checkpoint equal the local-shard ``reference`` (``reference_fp32``) bit for
    bit. ``scenario``: the ledger scenario, given ``data_lost``."""
    server.set_faults(REMOTE_FAULTS)
    killed = run(config, kill_when=lambda line: line.startswith("step 5/"))
    assert killed.killed, killed.output[-3000:]
    assert sum(1 for r in server.requests() if r["fault"]) == 4
    carried = carried_retries(tmp_path / "ckpt")  # of the 4 faults the killed run met (all, or most)
    assert 0 < carried <= 4
    server.set_faults(REMOTE_FAULTS[::-1])  # new rules, fresh counts: the resumed run meets 4 faults too
    edit_config(config, logging={"tensorboard_dir": str(tmp_path / "tb-resumed")})
    resumed = run(config)
    resumed.check_ok()
    start = resumed.resumed_at
    assert start is not None and start >= 2, resumed.output[-3000:]
    scalars = tb_scalars(tmp_path / "tb-resumed")
    assert max(scalars["data/retries"].values()) == carried + 4
    losses = scalars["train/loss"]
    lost = [s for s in range(start + 1, 9) if s not in losses or not bitwise_equal(losses[s], reference["loss"][s])]
    # everything but where the shards are (the recorded dataset path: a URL here, a directory there) and the loader
    # states' retry counts (the faults met)
    lost += [k for k in state_differences(reference["ckpt"] / "step_00000008", tmp_path / "ckpt" / "step_00000008")
             if not k.endswith(("/path", "/retries"))]
    scenario["data_lost"] = len(lost)
    assert not lost, lost[:20]

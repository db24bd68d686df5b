"""Fault-injection suite (``tests/faults``): shared runs, and the scenario ledger printed at the end.

Every test injects one or more real faults (SIGKILL, a kill inside a save, a full disk, corrupt shards, NaNs, bad
configs, crafted pickles) and asserts the documented outcome. Each fault is recorded in the ledger with
``ledger.scenario(name)``: it counts as *survived* only if the block finished (all its assertions held), and
``data_lost`` is what the test measured (steps whose resumed loss or state differs, checkpoints damaged,
samples neither delivered nor counted). The session ends with::

    faults: 23 injected, 23 survived, data lost = 0
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
from faultkit import RunConfig, run, tb_scalars


class Ledger:
    def __init__(self):
        self.rows: list[dict] = []

    @contextlib.contextmanager
    def scenario(self, name: str, injected: int = 1):
        row = {"name": name, "injected": injected, "survived": False, "data_lost": 0}
        self.rows.append(row)
        yield row
        row["survived"] = True


def pytest_configure(config):
    config._fault_ledger = Ledger()


@pytest.fixture(scope="session")
def ledger(pytestconfig) -> Ledger:
    return pytestconfig._fault_ledger


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = getattr(config, "_fault_ledger", Ledger()).rows
    if not rows:
        return
    tr = terminalreporter
    tr.section("fault injection")
    for row in rows:
        status = "survived" if row["survived"] else "NOT SURVIVED"
        tr.write_line(f"  {row['name']:<72} x{row['injected']}  {status}  data lost {row['data_lost']}")
    injected = sum(r["injected"] for r in rows)
    survived = sum(r["injected"] for r in rows if r["survived"])
    lost = sum(r["data_lost"] for r in rows)
    tr.write_line(f"faults: {injected} injected, {survived} survived, data lost = {lost}")


# --- shared runs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def run_config(tokenizer_path, shard_dir, shard_seq_length):
    """``run_config(tmp, **sections) -> config path``: the fault suite's tiny GPT (see faultkit.RunConfig)."""
    return RunConfig(tokenizer_path, shard_dir, shard_seq_length)


@pytest.fixture(scope="session")
def reference_fp32(run_config, tmp_path_factory):
    """The uninterrupted fp32 run every interrupted run is compared with (read-only: copy before changing).

    8 steps on 2 ranks, ZeRO-2, dropout on (so RNG restore matters), checkpoints every 2 steps, keep_last 2.
    """
    tmp = tmp_path_factory.mktemp("reference_fp32")
    config = run_config(tmp)
    result = run(config)
    result.check_ok()
    return {"dir": tmp, "config": config, "output": result.output, "ckpt": tmp / "ckpt",
            "loss": tb_scalars(tmp / "tb")["train/loss"]}


@pytest.fixture
def copy_checkpoints(tmp_path):
    """``copy_checkpoints(src_root, dst_root, steps=None)``: copy a checkpoint root (optionally some steps)."""
    def copy(src: Path, dst: Path, steps=None) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        for child in Path(src).iterdir():
            if child.is_dir() and (steps is None or child.name in {f"step_{s:08d}" for s in steps}):
                shutil.copytree(child, dst / child.name)
        if steps:
            (dst / "latest").write_text(f"step_{max(steps):08d}")
        else:
            shutil.copy(Path(src) / "latest", dst / "latest")
        return dst

    return copy

"""The code's shape, enforced: layers that point down (the import-linter contract in pyproject.toml), imports of
largelm modules at the top of each file, modules a reader can take in at once, ruff clean, and preflight resolving
a config without changing the caller's.

The layer contract is run as the ``lint-imports`` command runs it; one test proves it can fail by adding an upward
import to a copy of the package.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_utils import tiny_config

from largelm.config import load_config
from largelm.train.preflight import precision_choice, preflight

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "largelm"
MAX_MODULE_LINES = 400
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run the layers contract of ``root/pyproject.toml`` against the ``largelm`` package under ``root``."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_layers_point_down():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "largelm layers point down KEPT" in result.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path):
    """The contract is not vacuous: the model layer importing the trainer is reported, naming both modules."""
    shutil.copytree(PACKAGE, tmp_path / "largelm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    layout = tmp_path / "largelm" / "model" / "layout.py"
    layout.write_text(layout.read_text() + "\nimport largelm.train.trainer  # upward: model -> train\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "largelm.model.layout -> largelm.train.trainer" in result.stdout


def test_ruff_is_clean():
    """pyproject.toml's ruff rules (pyflakes, pycodestyle, import order, bugbear) hold for the whole tree."""
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "--no-cache", "largelm", "tests", "tools", "bench", "launch"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_modules_stay_readable_in_one_sitting():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _modules()}
    long = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {long}"


def _function_local_largelm_imports(path: Path) -> list[str]:
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.ImportFrom) and not inner.level:
                names = [inner.module or ""]
            elif isinstance(inner, ast.Import):
                names = [a.name for a in inner.names]
            else:
                continue
            # "# lazy (why)" marks a deliberate deferral of a heavy import (e.g. torch before the config is valid)
            if any(n.split(".")[0] == "largelm" for n in names) and "# lazy" not in lines[inner.lineno - 1]:
                found.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    return found


def test_largelm_imports_sit_at_the_top_of_each_file():
    """A file's top says what it depends on; deferred imports are marked ``# lazy (reason)``."""
    local = [hit for p in _modules() for hit in _function_local_largelm_imports(p)]
    assert not local, f"function-local largelm imports (move them to the top or mark '# lazy (reason)'): {local}"


def test_preflight_returns_a_resolved_config_and_leaves_the_callers_alone(
    tmp_path, tokenizer_path, shard_dir, shard_seq_length
):
    cfg = load_config(tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length, train={"precision": "auto"}))
    before = cfg.model_dump()
    resolved = preflight(cfg, world_size=1)
    assert cfg.model_dump() == before and precision_choice(cfg) is None
    assert cfg.model.vocab_size is None and cfg.train.precision == "auto"
    assert resolved is not cfg and resolved.model is not cfg.model and resolved.train is not cfg.train
    assert resolved.model.vocab_size > 0 and resolved.train.precision in ("fp32", "bf16")
    assert precision_choice(resolved).precision == resolved.train.precision
    # everything preflight does not resolve is the caller's value
    assert {k: v for k, v in resolved.model_dump().items() if k not in ("model", "train")} == {
        k: v for k, v in before.items() if k not in ("model", "train")
    }


@pytest.mark.parametrize("resolved_twice", [False, True])
def test_preflight_is_idempotent(tmp_path, tokenizer_path, shard_dir, shard_seq_length, resolved_twice):
    """The launcher and every rank run preflight on the same file; running it on its own output changes nothing."""
    cfg = preflight(load_config(tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length)), world_size=1)
    again = preflight(cfg, world_size=1) if resolved_twice else cfg
    assert again.model_dump() == cfg.model_dump()


def test_the_launcher_imports_no_megatron():
    """Every launch starts largelm-launch, then DeepSpeed's runner, then the ranks: megatron-core (seconds of imports)
    belongs in the ranks only. The launcher's preflight (config, checkpoint, layout change) must not pull it in."""
    probe = "import sys, largelm.launch, largelm.ds_launcher; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "'megatron'" not in loaded, loaded

"""largelm.parallel.deepspeed_compat (and the ALL_PATCHES table): another DeepSpeed version is refused before
anything is patched; ``install_deepspeed_compat`` applies exactly the patches a run's configuration calls for and
logs them in one line; every table entry names a test that exists, and the table covers every name install can
return. What each patch *does* is pinned by the test its entry names."""

import ast
import inspect
import re
from pathlib import Path

import deepspeed
import pytest
import torch
from megatron.core.models.bert import bert_lm_head
from megatron.core.transformer import transformer_block
from mp_utils import single_rank_parallel_state
from train_utils import config_object

import largelm.train.engine as engine_module
from largelm.parallel import ALL_PATCHES, deepspeed_compat
from largelm.parallel.__main__ import main as print_patches
from largelm.parallel.cpu_compat import model_parallel_manual_seed
from largelm.parallel.deepspeed_compat import (
    DEEPSPEED_VERSION,
    PATCHES,
    check_deepspeed_version,
    install_deepspeed_compat,
)
from largelm.parallel.deepspeed_compat import launcher as launcher_compat
from largelm.parallel.megatron_compat import bert_norms
from largelm.parallel.sequence_parallel import SequenceParallelNorm
from largelm.train.step import DenseStep

ROOT = Path(__file__).resolve().parent.parent




def test_another_deepspeed_version_is_refused_before_anything_is_patched(monkeypatch):
    assert deepspeed.__version__ == DEEPSPEED_VERSION == "0.19.8"  # pyproject.toml pins it
    assert check_deepspeed_version() == DEEPSPEED_VERSION
    with pytest.raises(RuntimeError, match=r"written for DeepSpeed 0\.19\.8, but DeepSpeed 0\.20\.1 is installed"):
        check_deepspeed_version("0.20.1")
    monkeypatch.setattr(deepspeed, "__version__", "0.18.0")
    with pytest.raises(RuntimeError, match=r"DeepSpeed 0\.19\.8, but DeepSpeed 0\.18\.0 is installed.*"
                                           r"deepspeed==0\.19\.8"):
        install_deepspeed_compat(None, config_object(), world_size=1)  # refused before it looks at the engine
    from deepspeed.launcher import launch, runner

    real_subprocess, real_time = runner.subprocess, launch.time
    for context in (launcher_compat.local_launch_in_process, launcher_compat.fast_launch_poll):
        with pytest.raises(RuntimeError, match="0.18.0 is installed"), context():
            pass
    assert runner.subprocess is real_subprocess and launch.time is real_time


@pytest.fixture(scope="module")
def one_rank():
    with single_rank_parallel_state():
        yield


# (precision, configured ZeRO stage, extra parallel settings, grad_clip) -> the patches the engine gets
CASES = {
    "bf16-zero1": ("bf16", 1, {}, 1.0,
                   ["fused_adamw", "bf16_grad_in_place", "fused_clip", "skip_dp_allreduce", "safe_checkpoint_engine"]),
    "bf16-zero1-noclip": ("bf16", 1, {}, 0.0,
                          ["fused_adamw", "bf16_grad_in_place", "skip_dp_allreduce", "safe_checkpoint_engine"]),
    "fp32-zero0-clip": ("fp32", 0, {}, 1.0, ["fused_adamw", "zero0_grad_norm", "skip_dp_allreduce", "overflow_guard",
                                             "safe_checkpoint_engine"]),
    "fp32-zero2": ("fp32", 2, {"single_replica_zero": "as_configured"}, 1.0,
                   ["fused_adamw", "safe_checkpoint_engine"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_install_applies_exactly_the_patches_of_the_run(one_rank, monkeypatch, capsys, case):
    precision, stage, parallel, clip, expected = CASES[case]
    monkeypatch.setenv("LOCAL_RANK", "0")
    returned = []

    def recording(engine, cfg, world_size):
        names = install_deepspeed_compat(engine, cfg, world_size)
        returned.append(names)
        return names

    monkeypatch.setattr(engine_module, "install_deepspeed_compat", recording)
    cfg = config_object(parallel={"zero_stage": stage, **parallel}, train={"precision": precision},
               optimizer={"grad_clip": clip})
    model_parallel_manual_seed(1)
    step = DenseStep(cfg, world_size=1)
    assert returned == [expected]
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("deepspeed_compat")]
    assert lines == [f"deepspeed_compat (DeepSpeed 0.19.8): {', '.join(expected)}"]
    assert "one data-parallel replica" not in out  # the configured stage ran
    engine = step.engine
    assert type(engine.checkpoint_engine).__name__ == "SafeTorchCheckpointEngine"
    assert engine.enable_backward_allreduce == ("skip_dp_allreduce" not in expected)
    step.train_step(iter([{"tokens": torch.randint(0, 200, (2, 17))}] * 2))  # the patched engine trains
    assert engine.was_step_applied() and torch.isfinite(torch.as_tensor(engine.get_global_grad_norm()))


def test_one_replica_substitution_is_logged_with_the_patches(one_rank, monkeypatch, capsys):
    """fp32 ZeRO-2 on one replica runs DeepSpeed's ZeRO-0 engine (deepspeed_config.engine_zero_stage): it gets the
    ZeRO-0 patches, and rank 0 says so first."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    model_parallel_manual_seed(1)
    DenseStep(config_object(parallel={"zero_stage": 2}, optimizer={"grad_clip": 0.0}), world_size=1)
    out = capsys.readouterr().out
    assert ("one data-parallel replica: DeepSpeed runs ZeRO-0 for parallel.zero_stage=2 (same math, nothing to "
            "partition; parallel.single_replica_zero)\ndeepspeed_compat (DeepSpeed 0.19.8): fused_adamw, "
            "zero0_grad_norm, skip_dp_allreduce, overflow_guard, safe_checkpoint_engine\n") in out


def _appended_names(function) -> set[str]:
    """The string literals ``function`` appends to a list: the names install_deepspeed_compat can return."""
    tree = ast.parse(inspect.getsource(function).lstrip())
    return {node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "append"
            and node.args and isinstance(node.args[0], ast.Constant)}


def test_the_table_covers_every_name_install_can_return():
    engine_entries = {p.name for p in PATCHES if p.scope == "engine"}
    assert _appended_names(install_deepspeed_compat) == engine_entries
    every = set().union(*(expected for *_, expected in CASES.values()))
    assert every <= engine_entries


def test_every_entry_names_a_test_that_exists():
    names = [p.name for p in ALL_PATCHES]
    assert len(names) == len(set(names)), "patch names must be unique"
    assert set(PATCHES) <= set(ALL_PATCHES)
    for patch in ALL_PATCHES:
        assert all(getattr(patch, field).strip() for field in ("target", "replaces", "why", "when", "library")), patch
        assert patch.scope in {"engine", "engine build", "checkpoint", "launcher", "process", "model build"}, patch
        match = re.fullmatch(r"(tests/[\w/]+\.py)::(test_\w+)", patch.test)
        assert match, f"{patch.name}: {patch.test!r} is not a pytest node id of a test function"
        path = ROOT / match.group(1)
        assert path.is_file(), f"{patch.name}: {path} does not exist"
        functions = {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
        assert match.group(2) in functions, f"{patch.name}: {patch.test} names no test function"


def test_python_m_largelm_parallel_prints_every_patch(capsys):
    print_patches()
    out = capsys.readouterr().out
    for patch in ALL_PATCHES:
        assert f"{patch.name}  [{patch.library}, {patch.scope}]" in out and patch.test in out
    assert deepspeed_compat.PATCHES is PATCHES


def test_bert_norms_swaps_megatrons_norm_globals_only_during_an_sp_build():
    original = transformer_block.LayerNormImpl, bert_lm_head.LNImpl
    with bert_norms(sequence_parallel=False):
        assert (transformer_block.LayerNormImpl, bert_lm_head.LNImpl) == original
    with pytest.raises(ValueError), bert_norms(sequence_parallel=True):
        assert transformer_block.LayerNormImpl is bert_lm_head.LNImpl is SequenceParallelNorm
        raise ValueError("a failing build")
    assert (transformer_block.LayerNormImpl, bert_lm_head.LNImpl) == original

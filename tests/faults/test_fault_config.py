"""Config and launch faults are refused before any process group starts or any step runs, naming what is wrong:
by the launcher (``largelm-launch``, which then starts nothing) and by each rank's entry point (which runs the
same preflight when started by another launcher)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from faultkit import edit_config

from largelm import launch
from largelm.train import main as rank_main


def _refused(capsys, config, nproc=2, *overrides) -> str:
    code = launch.main(["--config", str(config), "--nproc", str(nproc), "--", *overrides])
    out = capsys.readouterr()
    assert code == 2, out
    assert "--module largelm.train.main" not in out.out + out.err  # no launcher command was printed or run
    return out.err


def _set(config, section, key, value):
    data = yaml.safe_load(config.read_text())
    data[section][key] = value
    config.write_text(yaml.safe_dump(data))
    return config


def _hf_tokenizer(config):
    """Point tokenizer.model at a Hugging Face tokenizer.json (not a sentencepiece model)."""
    hf = config.parent / "tokenizer.json"
    hf.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}))
    return _set(config, "tokenizer", "model", str(hf))


def _tokenizer_dir(config):
    """Point tokenizer.model at the directory ``train_tokenizer --out DIR`` writes (DIR/spm.model)."""
    directory = config.parent / "tok"
    directory.mkdir()
    shutil.copy(yaml.safe_load(config.read_text())["tokenizer"]["model"], directory / "spm.model")
    return _set(config, "tokenizer", "model", str(directory))


CASES = {
    "tokenizer file that is not sentencepiece": (_hf_tokenizer, 2,
                                                 r"tokenizer\.model: \S+tokenizer\.json is not a sentencepiece model"),
    "tokenizer directory instead of its model file": (_tokenizer_dir, 2,
                                                      r"tokenizer\.model: tokenizer model \S+tok is a directory, not a "
                                                      r"sentencepiece model file \(did you mean \S+tok/spm\.model\?\)"),
    "unknown field": (lambda c: _set(c, "train", "stepz", 5), 2, r"train\.stepz: unknown field"),
    "wrong type": (lambda c: _set(c, "train", "steps", "many"), 2,
                   r"train\.steps: Input should be a valid integer.*got 'many'"),
    "impossible value": (lambda c: _set(c, "optimizer", "min_lr", 1.0), 2,
                         r"optimizer\.min_lr=1\.0 is larger than optimizer\.lr"),
    "world size not matching the layout": (lambda c: _set(c, "parallel", "tensor_parallel", 2), 3,
                                           r"world size 3 is not divisible by parallel\.tensor_parallel x "
                                           r"parallel\.pipeline_parallel = 2"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_is_refused_before_launch(case, run_config, tmp_path, capsys, ledger):
    change, nproc, message = CASES[case]
    with ledger.scenario(f"config fault: {case}"):
        config = change(run_config(tmp_path))
        assert re.search(message, _refused(capsys, config, nproc)), message


def test_bad_override_or_tokenizer_is_refused_by_both_entry_points(run_config, tmp_path, capsys, ledger, monkeypatch):
    config = run_config(tmp_path)
    with ledger.scenario("override value that is not YAML"):
        assert re.search(r"override 'train\.steps=\[1': the value '\[1' is not valid YAML",
                         _refused(capsys, config, 2, "train.steps=[1"))
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with ledger.scenario("override on an empty config file"):
        assert f"override 'train.steps=3': {empty} does not hold a mapping of sections (it is empty)" in _refused(
            capsys, empty, 2, "train.steps=3")
    with ledger.scenario("tokenizer that is not sentencepiece, caught by a rank started without largelm-launch"):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        assert rank_main.main(["--config", str(_hf_tokenizer(config))]) == 2
        assert "tokenizer.json is not a sentencepiece model" in capsys.readouterr().err


def test_damaged_checkpoint_is_passed_over_or_named_before_launch(run_config, tmp_path, capsys, ledger):
    """The launcher checks the checkpoint the resume would load (``find_latest``: ``latest``, or the newest complete
    one when that one's manifest or files are damaged), and names a saved config it cannot read."""
    from largelm.checkpoint.manager import write_manifest
    from largelm.config import dump_config, load_config
    from largelm.train.preflight import preflight

    config = run_config(tmp_path)
    root = tmp_path / "ckpt"  # the config's checkpoint.dir
    written_with = dump_config(preflight(load_config(config), world_size=2))  # what a 2-rank run saves
    for step in (2, 4):
        step_dir = root / f"step_{step:08d}"
        step_dir.mkdir(parents=True)
        (step_dir / "config.yaml").write_text(written_with)
        write_manifest(step_dir, {"step": step, "world_size": 2})
    (root / "latest").write_text("step_00000004")
    with ledger.scenario("torn manifest.json in the latest checkpoint"):
        (root / "step_00000004" / "manifest.json").write_text('{"step": 4, "wor')
        assert launch.main(["--config", str(config), "--nproc", "2", "--dry-run"]) == 0  # step 2 fits
        capsys.readouterr()
        err = _refused(capsys, config, 1)  # so it is step 2 that is checked
        assert f"checkpoint {root / 'step_00000002'} was written in another parallel layout" in err
        assert "TP=1 PP=1 DP=2 ZeRO-2 fp32 -> TP=1 PP=1 DP=1 ZeRO-2 (engine runs ZeRO-0) fp32 (2 -> 1 ranks)" in err
    with ledger.scenario("unreadable config.yaml that its manifest vouches for"):
        saved_config = root / "step_00000002" / "config.yaml"
        saved_config.write_text("model: [")
        write_manifest(saved_config.parent, {"step": 2, "world_size": 2})
        assert f"checkpoint config {saved_config} is not valid YAML" in _refused(capsys, config, 2)
    with ledger.scenario("no checkpoint with a readable manifest"):
        (root / "step_00000002" / "manifest.json").write_text("")
        assert re.search(r"checkpoint\.dir: no usable checkpoint in \S+ckpt:\n.*manifest \S+ is corrupt",
                         _refused(capsys, config, 2))


@pytest.mark.slow
def test_checkpoint_of_another_shape_or_layout_is_refused(reference_fp32, run_config, copy_checkpoints, tmp_path,
                                                          capsys, ledger, monkeypatch):
    root = copy_checkpoints(reference_fp32["ckpt"], tmp_path / "ckpt")
    config = run_config(tmp_path)  # checkpoint.dir is tmp_path/ckpt: the copy of a 2-rank ZeRO-2 run
    with ledger.scenario("checkpoint from a different model shape (hidden size, layers)"):
        err = _refused(capsys, config, 2, "model.hidden_size=128", "model.num_layers=4")
        assert f"checkpoint {root / 'step_00000008'} does not match this config" in err
        assert "model.num_layers: checkpoint 2 vs config 4" in err
        assert "model.hidden_size: checkpoint 64 vs config 128" in err
    with ledger.scenario("checkpoint from a different world size / ZeRO stage"):
        err = _refused(capsys, config, 1, "parallel.zero_stage=1")
        assert "parallel layout changes: TP=1 PP=1 DP=2 ZeRO-2 fp32 -> TP=1 PP=1 DP=1 ZeRO-1 (engine runs ZeRO-0) " \
               "fp32 (2 -> 1 ranks)" in err
        assert "checkpoint.reshard_on_resume=true" in err
    with ledger.scenario("checkpoint shape mismatch caught by a rank started without largelm-launch"):
        edit_config(config, model={"hidden_size": 128})
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        assert rank_main.main(["--config", str(config)]) == 2
        assert "model.hidden_size: checkpoint 64 vs config 128" in capsys.readouterr().err


def _precision_on_rank(rank: int, world_size: int) -> str:
    """A rank of a mixed allocation: rank 0 resolved ``auto`` to bf16 (AVX512_BF16 node), the others to fp32."""
    from largelm.config import ConfigError
    from largelm.parallel import groups
    from largelm.train.trainer import check_ranks_agree_on_precision

    groups.init_distributed("gloo")
    try:
        check_ranks_agree_on_precision("bf16" if rank == 0 else "fp32")
        return "accepted"
    except ConfigError as err:
        return str(err)
    finally:
        groups.destroy()


def test_precision_faults_are_named(run_config, tmp_path, capsys, ledger):
    """``train.precision: auto`` resolved per node: nodes of two CPU kinds disagree, refused on every rank before
    the model is built; and a checkpoint whose config says ``auto`` cannot say what it was trained in."""
    from mp_utils import run_ranks

    from largelm.checkpoint.manager import write_manifest
    from largelm.config import dump_config, load_config
    from largelm.train.preflight import preflight

    with ledger.scenario("ranks whose devices resolve train.precision=auto differently (mixed CPU kinds)"):
        errors = run_ranks(_precision_on_rank, 2)
        assert errors[0] == errors[1] and "the ranks chose different precisions" in errors[0], errors
        assert "rank 0: bf16 on" in errors[0] and "rank 1: fp32 on" in errors[0]
    with ledger.scenario("checkpoint config with train.precision=auto (not what it was trained in)"):
        config = run_config(tmp_path)
        step_dir = tmp_path / "ckpt" / "step_00000002"
        step_dir.mkdir(parents=True)
        saved = yaml.safe_load(dump_config(preflight(load_config(config), world_size=2)))
        saved["train"]["precision"] = "auto"
        (step_dir / "config.yaml").write_text(yaml.safe_dump(saved))
        write_manifest(step_dir, {"step": 2, "world_size": 2})
        (tmp_path / "ckpt" / "latest").write_text(step_dir.name)
        err = _refused(capsys, config, 2)
        assert f"{step_dir / 'config.yaml'}: train.precision is 'auto'" in err
    with ledger.scenario("one-replica bf16 checkpoint resumed in fp32 (another DeepSpeed optimizer)"):
        bf16_run = load_config(config, ["train.precision=bf16", "checkpoint.resume=false"])
        saved = yaml.safe_load(dump_config(preflight(bf16_run, world_size=1)))
        saved["checkpoint"]["resume"] = True
        (step_dir / "config.yaml").write_text(yaml.safe_dump(saved))
        write_manifest(step_dir, {"step": 2, "world_size": 1})
        err = _refused(capsys, config, 1, "train.precision=fp32")
        assert "train.precision: the checkpoint was trained in bf16 (DeepSpeed ran ZeRO-1), this run is fp32 " \
               "(ZeRO-0): or resume with train.precision=bf16" in err
        code = launch.main(["--config", str(config), "--nproc", "1", "--dry-run", "--", "train.precision=auto"])
        assert code == 0 and "--module largelm.train.main" in capsys.readouterr().out  # auto resumes in bf16

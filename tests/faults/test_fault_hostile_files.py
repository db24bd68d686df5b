"""Files the user did not write (a downloaded checkpoint, a crafted config) cannot make largelm read, hash or copy
files outside their directory, nor spend gigabytes or minutes on a few hundred bytes. Each case fails with an
error that names the file and what is wrong, before anything is read or used."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
import torch
import yaml

from largelm import launch
from largelm.checkpoint.consolidated import Consolidated, load_consolidated, save_consolidated
from largelm.checkpoint.full_weights import checkpoint_config
from largelm.checkpoint.manager import CheckpointError, find_latest, verify_checkpoint, write_manifest
from largelm.config import ConfigError, ModelConfig, load_config
from largelm.convert.hf import read_hf_weights, save_hf_weights
from largelm.errors import ConversionError
from largelm.fileio import MAX_YAML_VALUES, ordinary_mode
from largelm.model.layout import param_shapes

# "Billion laughs": 9 levels of 9 aliases each = 9^9 (387 million) strings in a few hundred bytes.
ALIAS_BOMB = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                       + [f"{n}: &{n} [{', '.join(['*' + p] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]) + "\n"


def _refused_by_launcher(capsys, config) -> str:
    code = launch.main(["--config", str(config), "--nproc", "1"])
    out = capsys.readouterr()
    assert code == 2, out
    return out.err


def test_yaml_alias_bomb_config_is_refused_quickly(run_config, tmp_path, capsys, ledger):
    assert len(ALIAS_BOMB) < 500
    with ledger.scenario("YAML alias bomb as the run config (9^9 values in 400 bytes)"):
        bomb = tmp_path / "bomb.yaml"
        run = yaml.safe_load(run_config(tmp_path).read_text())
        del run["name"]
        bomb.write_text(ALIAS_BOMB + yaml.safe_dump(run) + "name: *i\n")
        started = time.monotonic()
        err = _refused_by_launcher(capsys, bomb)
        assert time.monotonic() - started < 10
        assert f"bomb.yaml: its anchors/aliases expand to more than {MAX_YAML_VALUES:,} values" in err
        assert len(err) < 2000


def test_yaml_alias_bomb_in_a_checkpoint_config_is_refused(run_config, tmp_path, capsys, ledger):
    """Configs arrive inside downloaded checkpoints: preflight (resume) and the tools read them."""
    config = run_config(tmp_path)
    step = tmp_path / "ckpt" / "step_00000002"
    step.mkdir(parents=True)
    (step / "config.yaml").write_text(ALIAS_BOMB)
    write_manifest(step, {"step": 2, "world_size": 1})
    (step.parent / "latest").write_text(step.name)
    with ledger.scenario("YAML alias bomb as a checkpoint's config.yaml (resume and tools)"):
        err = _refused_by_launcher(capsys, config)
        assert f"checkpoint config {step / 'config.yaml'}: its anchors/aliases expand" in err and len(err) < 2000
        with pytest.raises(CheckpointError, match="anchors/aliases expand to more than"):
            checkpoint_config(step)


def test_a_huge_offending_value_is_named_not_reprinted(run_config, tmp_path, ledger):
    with ledger.scenario("config value of 1 MB in a field that rejects it"):
        config = run_config(tmp_path)
        data = yaml.safe_load(config.read_text())
        data["train"]["steps"] = "x" * 1_000_000
        config.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError) as err:
            load_config(config)
        message = str(err.value)
        assert "train.steps" in message and "(1,000,002 characters)" in message and len(message) < 1000


def _checkpoint(root, step: int = 2):
    """A minimal complete checkpoint directory: a config and a state file, vouched for by the manifest."""
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("model: {}\nparallel: {}\n")
    (path / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    write_manifest(path, {"step": step, "world_size": 1})
    return path


def _edit_manifest(path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest["files"])
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.pt", "a/../../outside.pt"])
def test_manifest_paths_outside_the_checkpoint_are_refused(tmp_path, ledger, name):
    (tmp_path / "outside.pt").write_bytes(b"secret")
    with ledger.scenario(f"checkpoint manifest naming {name} (a content oracle)"):
        ckpt = _checkpoint(tmp_path / "ckpt")
        _edit_manifest(ckpt, lambda files: files.update({name: {"sha256": "0" * 64, "bytes": 6}}))
        with pytest.raises(CheckpointError, match=rf"files\[{name!r}\]: {name!r} is not a relative path inside"):
            verify_checkpoint(ckpt)


def test_manifest_symlink_leading_out_is_refused(tmp_path, ledger):
    (tmp_path / "secret.txt").write_text("secret")
    with ledger.scenario("checkpoint file that is a symlink out of the checkpoint"):
        ckpt = _checkpoint(tmp_path / "ckpt")
        os.symlink(tmp_path / "secret.txt", ckpt / "notes.txt")
        _edit_manifest(ckpt, lambda files: files.update({"notes.txt": {"sha256": "0" * 64, "bytes": 6}}))
        with pytest.raises(CheckpointError, match=r"'notes.txt' leads outside .* \(a symlink to .*secret\.txt\)"):
            verify_checkpoint(ckpt)


def test_manifest_that_vouches_for_nothing_or_not_for_everything_is_refused(tmp_path, ledger):
    with ledger.scenario("checkpoint manifest with an empty files map"):
        empty = _checkpoint(tmp_path / "a")
        _edit_manifest(empty, lambda files: files.clear())
        with pytest.raises(CheckpointError, match=r"manifest\.json lists no files"):
            verify_checkpoint(empty)
    with ledger.scenario("state file added to a checkpoint after its save (unlisted)"):
        added = _checkpoint(tmp_path / "b")
        (added / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"planted")
        with pytest.raises(CheckpointError, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt not listed in its "
                                                  r"manifest"):
            verify_checkpoint(added)
        # resume passes over it to the previous good checkpoint, saying why
        good = _checkpoint(tmp_path / "b", step=1)
        assert find_latest(tmp_path / "b").path == good


def _consolidated_with_tokenizer(tmp_path, tokenizer_path):
    """A small consolidated model directory (random weights) that carries its tokenizer, as a download would."""
    model = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=8, vocab_size=1000,
                        make_vocab_size_divisible_by=8)
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(shape, generator=g) for n, shape in param_shapes(model).items()}
    out = tmp_path / "downloaded"
    save_consolidated(out, Consolidated(tensors, model, None, {}, 1, {"kind": "test"}, tokenizer_path))
    return out


def _edit_meta(model_dir, change) -> None:
    meta = json.loads((model_dir / "largelm.json").read_text())
    change(meta["tokenizer"])
    (model_dir / "largelm.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("name", ["../../secret.txt", "/etc/hostname"])
def test_consolidated_tokenizer_path_out_of_the_model_is_refused(tmp_path, tokenizer_path, ledger, name):
    (tmp_path / "secret.txt").write_text("ssh key")
    with ledger.scenario(f"consolidated largelm.json naming tokenizer file {name} (copied into outputs before)"):
        model_dir = _consolidated_with_tokenizer(tmp_path, tokenizer_path)
        assert load_consolidated(model_dir).tokenizer == model_dir / "tokenizer.model"  # as written: fine
        _edit_meta(model_dir, lambda tok: tok.update(file=name))
        with pytest.raises(ConversionError, match=rf"largelm\.json: tokenizer\.file: {name!r} is not a relative "
                                                  "path inside"):
            load_consolidated(model_dir)


def test_consolidated_tokenizer_replaced_is_refused_by_its_hash(tmp_path, tokenizer_path, ledger):
    with ledger.scenario("consolidated model whose tokenizer.model was replaced (sha256 never compared before)"):
        model_dir = _consolidated_with_tokenizer(tmp_path, tokenizer_path)
        (model_dir / "tokenizer.model").write_bytes(b"another tokenizer")
        with pytest.raises(ConversionError, match=r"tokenizer file tokenizer\.model does not match the sha256"):
            load_consolidated(model_dir)


def test_written_weights_get_ordinary_file_permissions(tmp_path, tokenizer_path, ledger):
    """safetensors creates files with mode 0600: a team sharing the output directory could not read the weights."""
    with ledger.scenario("weights written by safetensors with mode 0600 (consolidated model)"):
        model_dir = _consolidated_with_tokenizer(tmp_path, tokenizer_path)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in model_dir.iterdir()}
        assert modes["model.safetensors"] == ordinary_mode() == modes["largelm.json"], modes


@pytest.mark.parametrize("name", ["../secret.safetensors", "/etc/hostname"])
def test_hf_index_naming_files_outside_the_model_is_refused(tmp_path, ledger, name):
    model = tmp_path / "hf-download"
    model.mkdir()
    (tmp_path / "secret.safetensors").write_bytes(b"not yours")
    with ledger.scenario(f"Hugging Face weight index naming {name}"):
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": name}}))
        with pytest.raises(ConversionError, match=rf"index\.json: weight_map: {name!r} is not a relative path"):
            read_hf_weights(model)


def test_hf_export_weights_get_ordinary_file_permissions(tmp_path, ledger):
    with ledger.scenario("export-hf weights written with mode 0600 (sharded and not)"):
        tensors = {f"w{i}": torch.zeros(64) for i in range(4)}
        save_hf_weights(tensors, tmp_path, max_shard_size=600)  # sharded: 4 files + index
        (tmp_path / "one").mkdir()
        save_hf_weights(tensors, tmp_path / "one", max_shard_size=1 << 20)
        files = list(tmp_path.glob("*.safetensors")) + list((tmp_path / "one").glob("*.safetensors"))
        assert len(files) >= 3 and {stat.S_IMODE(f.stat().st_mode) for f in files} == {ordinary_mode()}

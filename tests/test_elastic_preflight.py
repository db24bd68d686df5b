"""Preflight of a resume in another parallel layout (largelm/checkpoint/elastic.py): refused without
``checkpoint.reshard_on_resume``, naming the old -> new layout and the setting; allowed with it; a change of the
model itself (shape, sequence length) refused either way. No process group: a saved config.yaml and manifest."""

from __future__ import annotations

import pytest
import yaml
from train_utils import config_object

from largelm.checkpoint.manager import write_manifest
from largelm.config import ConfigError
from largelm.train.preflight import _check_checkpoint


@pytest.fixture
def saved(tmp_path):
    """``saved(cfg, world_size)``: a checkpoint under tmp_path written by ``cfg`` on ``world_size`` ranks."""
    step = tmp_path / "step_00000002"
    step.mkdir()
    (tmp_path / "latest").write_text(step.name)

    def write(cfg, world_size: int) -> None:
        (step / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        write_manifest(step, {"world_size": world_size})

    return write


def _config(tmp_path, *overrides: dict, **sections):
    sections = {"checkpoint": {"dir": str(tmp_path)}, **sections}
    for extra in overrides:
        for name, values in extra.items():
            sections[name] = {**sections.get(name, {}), **values}
    return config_object(**sections)


def test_a_layout_change_is_refused_naming_it_and_the_setting(tmp_path, saved):
    saved(_config(tmp_path, parallel={"zero_stage": 1}), 2)
    with pytest.raises(ConfigError) as refused:
        _check_checkpoint(_config(tmp_path, parallel={"zero_stage": 1}), 1)
    text = str(refused.value)
    assert f"checkpoint {tmp_path / 'step_00000002'} was written in another parallel layout" in text
    assert ("parallel layout changes: TP=1 PP=1 DP=2 ZeRO-1 fp32 -> TP=1 PP=1 DP=1 ZeRO-1 (engine runs ZeRO-0) fp32 "
            "(2 -> 1 ranks)") in text
    assert "optimizer carried: fp32 master weights, Adam exp_avg/exp_avg_sq and step count" in text
    assert "tokens per optimizer step: 128 -> 64" in text
    assert "resume it resharded with checkpoint.reshard_on_resume=true" in text
    _check_checkpoint(_config(tmp_path, parallel={"zero_stage": 1}, checkpoint={"reshard_on_resume": True}), 1)

    with pytest.raises(ConfigError, match=r"DP=2 ZeRO-1 fp32 -> TP=1 PP=1 DP=2 ZeRO-3 fp32 \(2 -> 2 ranks\)"):
        _check_checkpoint(_config(tmp_path, parallel={"zero_stage": 3}), 2)
    _check_checkpoint(_config(tmp_path, parallel={"zero_stage": 1}), 2)  # the same layout: the exact path, no flag


def test_a_model_change_is_refused_even_with_reshard_on_resume(tmp_path, saved):
    saved(_config(tmp_path, parallel={"zero_stage": 1}), 2)
    flag = {"checkpoint": {"reshard_on_resume": True}}
    with pytest.raises(ConfigError, match=r"the model shape differs; a resume may change the parallel layout, not the "
                                          r"model\):\n  model.hidden_size: checkpoint 64 vs config 128"):
        _check_checkpoint(_config(tmp_path, flag, model={"hidden_size": 128}), 1)
    with pytest.raises(ConfigError, match=r"model.vocab_size: checkpoint 200 vs config 256"):
        _check_checkpoint(_config(tmp_path, flag, model={"vocab_size": 256}), 2)
    with pytest.raises(ConfigError, match=r"model.seq_length: checkpoint 16 vs config 32; a resume in another "
                                          r"parallel layout keeps the model and its sequence length"):
        _check_checkpoint(_config(tmp_path, flag, model={"seq_length": 32}), 1)


def test_an_expert_parallel_change_of_an_moe_checkpoint_needs_the_setting(tmp_path, saved):
    """MoE reshards like the dense model (tests/test_moe_reshard.py): an EP change is a layout change, refused
    without the setting and allowed with it; ZeRO-3 with EP > 1 stays refused by the config itself."""
    moe = {"arch": "moe", "style": "llama", "moe": {"num_experts": 4, "top_k": 2, "ffn_size": 32}}
    saved(_config(tmp_path, model=moe, parallel={"zero_stage": 2, "expert_parallel": 2}), 2)
    with pytest.raises(ConfigError, match=r"DP=2 EP=2 ZeRO-2 fp32 -> TP=1 PP=1 DP=2 ZeRO-2 fp32 \(2 -> 2 ranks\)"
                                          r"[\s\S]*checkpoint.reshard_on_resume=true"):
        _check_checkpoint(_config(tmp_path, model=moe, parallel={"zero_stage": 2}), 2)
    _check_checkpoint(_config(tmp_path, model=moe, parallel={"zero_stage": 2},
                              checkpoint={"reshard_on_resume": True}), 2)
    _check_checkpoint(_config(tmp_path, model=moe, checkpoint={"reshard_on_resume": True}), 1)  # one rank
    with pytest.raises(ValueError, match=r"parallel.zero_stage=3 with parallel.expert_parallel=2"):
        _config(tmp_path, model=moe, parallel={"zero_stage": 3, "expert_parallel": 2})

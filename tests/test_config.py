"""Config loading and validation: good files load, bad ones fail naming the field; DeepSpeed JSON is derived."""

from pathlib import Path

import pytest
import yaml

from largelm.config import ConfigError, config_from_dict, load_config
from largelm.parallel.deepspeed_config import deepspeed_config
from largelm.train.schedule import lr_at

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def tiny() -> dict:
    return yaml.safe_load((Path(__file__).parent.parent / "configs" / "gpt-tiny.yaml").read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.model.num_layers > 0
    if cfg.model.vocab_size:
        assert cfg.model.padded_vocab_size(cfg.parallel.tensor_parallel) % 128 == 0


def test_realistic_shapes_are_what_they_claim():
    c125 = load_config("configs/gpt-125m.yaml")
    # 12 layers of 12*h^2 plus embeddings: ~124M parameters with the padded GPT-2 vocab
    h, v = c125.model.hidden_size, c125.model.padded_vocab_size()
    approx = 12 * c125.model.num_layers * h * h + v * h + c125.model.seq_length * h
    assert 120e6 < approx < 130e6
    llama = load_config("configs/llama-style-1b.yaml")
    assert llama.model.kv_groups == 4 and llama.model.ffn_size == 5632


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, source="test.yaml")
    return str(info.value)


def test_unknown_field_is_named():
    data = tiny()
    data["model"]["hiden_size"] = 64
    msg = _error(data)
    assert "model.hiden_size" in msg and "unknown field" in msg and "test.yaml" in msg


def test_wrong_type_is_named():
    data = tiny()
    data["train"]["steps"] = "many"
    assert "train.steps" in _error(data)


def test_impossible_values_are_named():
    data = tiny()
    data["model"]["num_attention_heads"] = 3
    assert "model.num_attention_heads" in _error(data)
    data = tiny()
    data["parallel"]["tensor_parallel"] = 8
    assert "parallel.tensor_parallel" in _error(data)
    data = tiny()
    data["parallel"].update(pipeline_parallel=2, zero_stage=2)
    msg = _error(data)
    assert "zero_stage" in msg and "pipeline" in msg
    data = tiny()
    data["parallel"].update(pipeline_parallel=2, zero_stage=1)
    data["train"]["grad_accum_steps"] = 1
    assert "train.grad_accum_steps" in _error(data)
    data = tiny()
    data["parallel"].update(pipeline_parallel=3, zero_stage=1)
    data["train"]["grad_accum_steps"] = 4
    assert "model.num_layers" in _error(data)
    data = tiny()
    data["parallel"]["sequence_parallel"] = True
    assert "parallel.sequence_parallel" in _error(data)


def test_world_size_must_divide_layout():
    data = tiny()
    data["parallel"]["tensor_parallel"] = 2
    cfg = config_from_dict(data)
    with pytest.raises(ConfigError, match="world size 3"):
        cfg.check_world_size(3)
    assert cfg.data_parallel_size(4) == 2


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    evil = tmp_path / "evil.yaml"
    evil.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_overrides_are_typed_and_validated():
    cfg = load_config("configs/gpt-tiny.yaml", ["train.steps=7", "optimizer.warmup_steps=0", "parallel.zero_stage=3",
                                                "model.tie_embeddings=false"])
    assert cfg.train.steps == 7 and cfg.parallel.zero_stage == 3 and cfg.model.tie_embeddings is False
    with pytest.raises(ConfigError, match="parallel.zero_stage"):
        load_config("configs/gpt-tiny.yaml", ["parallel.zero_stage=5"])


def test_deepspeed_config_is_generated_from_config():
    cfg = load_config("configs/gpt-tiny.yaml", ["parallel.zero_stage=3", "train.grad_accum_steps=4",
                                                "train.precision=bf16"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * 4 * 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["bf16"]["enabled"] is True
    assert ds["gradient_clipping"] == cfg.optimizer.grad_clip
    assert ds["optimizer"]["params"]["lr"] == cfg.optimizer.lr
    fp32 = deepspeed_config(load_config("configs/gpt-tiny.yaml", ["train.precision=fp32"]), world_size=1)
    assert fp32["bf16"]["enabled"] is False and "data_types" not in fp32


def test_lr_schedule_warmup_then_decay_to_min():
    cfg = load_config("configs/gpt-tiny.yaml", ["train.steps=100", "optimizer.warmup_steps=10"])
    o = cfg.optimizer
    lrs = [lr_at(s, o, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(o.lr / 10)
    assert lrs[9] == pytest.approx(o.lr)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(o.min_lr)
    lin = load_config("configs/gpt-tiny.yaml", ["optimizer.decay_style=linear", "optimizer.warmup_steps=0"]).optimizer
    assert lr_at(50, lin, 101) == pytest.approx((lin.lr + lin.min_lr) / 2)

"""The architecture registry (largelm/model/registry.py): lookups, complete entries, and that adding an
architecture is one ``register_arch`` call - a toy GPT variant registered here trains through ``build_step`` with
no other file changed."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from mp_utils import single_rank_parallel_state

from largelm.config import BertConfig, ConfigError, ModelConfig, config_from_dict
from largelm.model.registry import ARCHS, ArchSpec, get_arch, register_arch
from largelm.train.distill import DISTILL_LOSSES

TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 16, "vocab_size": 200}
PROBE_METHODS = ("dense", "first_stage_input", "stage_input", "stage_hidden", "last_stage_outputs", "finish",
                 "hf_auto_class", "hf_forward")


def test_unknown_arch_names_model_arch_and_the_known_ones():
    with pytest.raises(ConfigError, match=r"model.arch='t5' is not a registered architecture \(known: bert, gpt, moe;"):
        get_arch("t5")
    assert set(ARCHS) >= {"gpt", "bert"} and get_arch("gpt").name == "gpt"
    with pytest.raises(ValueError, match="already registered"):
        register_arch(get_arch("gpt"))


@pytest.mark.parametrize("name", ["gpt", "bert", "moe"])
def test_each_registered_spec_has_every_field(name):
    spec = ARCHS[name]
    assert spec.name == name
    for field in dataclasses.fields(ArchSpec):
        value = getattr(spec, field.name)
        if field.name == "config_section":
            assert value is None or isinstance(value, str)
        elif field.name in ("section_weight_fields", "causal_lm"):
            assert isinstance(value, (tuple, bool))
        elif field.name == "hf_imports":
            assert value and all(hasattr(m, "from_hf") and hasattr(m, "model_fields") for m in value.values())
        elif field.name in ("layer_prefix", "distill_objective"):
            assert isinstance(value, str) and value, field.name
        elif field.name == "probe":
            assert all(callable(getattr(value, m, None)) for m in PROBE_METHODS)
        elif field.name != "name":
            assert callable(value), field.name
    moe = {"style": "llama", "moe": {"num_experts": 4, "ffn_size": 32}} if name == "moe" else {}
    model = ModelConfig(arch=name, **TINY, **moe)
    section = BertConfig() if spec.config_section else None
    assert all(hasattr(section, f) for f in spec.section_weight_fields)
    shapes = spec.param_shapes(model, section, None)
    assert shapes and all(spec.dense_name(n, model) == n for n in shapes)  # dense names map to themselves
    assert any(n.startswith(f"{spec.layer_prefix}{TINY['num_layers'] - 1}.") for n in shapes)
    assert spec.distill_objective in DISTILL_LOSSES
    assert spec.flops_per_token(model, section) > 0
    adapter = spec.hf_export(model)
    assert adapter in spec.hf_imports.values() and adapter.architecture(*([section] if section else []))


def _toy_gpt_variant() -> ArchSpec:
    """A 'new architecture' built from GPT's pieces: its builders are GPT's on a config that names it; its forward
    also reports a metric, to show that extra metrics reach the trainer under train/ and valid/."""
    gpt = get_arch("gpt")
    as_gpt = lambda model_cfg: model_cfg.model_copy(update={"arch": "gpt"})  # noqa: E731

    def forward_metrics(model, batch, cfg):
        out = gpt.forward_metrics(model, batch, cfg)
        return {**out, "loss_x2": 2 * out["loss"].detach()}

    return dataclasses.replace(
        gpt, name="toy_gpt",
        build_model=lambda m, p, *s, **kw: gpt.build_model(as_gpt(m), p, *s, **kw),
        build_pipeline=lambda m, p, *s, **kw: gpt.build_pipeline(as_gpt(m), p, *s, **kw),
        forward_metrics=forward_metrics)


def test_a_registered_toy_architecture_trains_through_build_step(monkeypatch):
    from largelm.parallel.cpu_compat import model_parallel_manual_seed
    from largelm.train.step import DenseStep, build_step

    monkeypatch.setenv("LOCAL_RANK", "0")  # deepspeed.initialize insists (the launcher sets it)
    spec = register_arch(_toy_gpt_variant())
    try:
        cfg = config_from_dict({
            "model": {"arch": "toy_gpt", **TINY}, "tokenizer": {"model": "unused.model"},
            "data": {"train": [{"path": "unused"}]},
            "train": {"steps": 2, "micro_batch_size": 2, "grad_accum_steps": 2, "precision": "fp32"}})
        assert get_arch(cfg.model.arch) is spec
        with single_rank_parallel_state():
            model_parallel_manual_seed(1)
            step = build_step(cfg, 1)
            assert isinstance(step, DenseStep) and step.arch is spec
            batches = [{"tokens": torch.randint(0, 200, (2, 17), generator=torch.Generator().manual_seed(i))}
                       for i in range(4)]
            first = step.train_step(iter(batches[:2])).item()
            assert math.isfinite(first) and set(step.last_metrics) == {"train/loss_x2"}
            assert math.isclose(step.last_metrics["train/loss_x2"], 2 * first, rel_tol=1e-6)
            step.train_step(iter(batches[2:]))
            valid = step.eval_loss(batches[0]).item()
            assert math.isfinite(valid) and step.last_eval_metrics == {"valid/loss_x2": pytest.approx(2 * valid)}
    finally:
        ARCHS.pop("toy_gpt", None)


def test_an_unknown_architecture_is_refused_before_any_process_group(tmp_path, tokenizer_path, shard_dir,
                                                                     shard_seq_length, capsys):
    from train_utils import tiny_config

    from largelm.train import main as rank_main

    config = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length, model={"arch": "t5"})
    assert rank_main.main(["--config", str(config)]) == 2
    assert "model.arch='t5' is not a registered architecture (known: bert, gpt" in capsys.readouterr().err

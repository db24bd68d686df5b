"""Knowledge distillation (largelm/train/distill.py, tools/distill.py).

Fast: the loss, the every-k-th-layer mapping, config refusals, and a real distillation step (DeepSpeed engine,
teacher read from a real DeepSpeed checkpoint written by ``CheckpointManager``) in a one-rank process. Slow: the
launcher path through tools/distill.py (2 ranks) with the loss parts in the step lines and tensorboard.
The "student beats the no-teacher baseline" experiment is bench/distill_vs_baseline.py (too slow for tests).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from distill_utils import run_distill_tool
from mp_utils import single_rank_parallel_state
from train_utils import REPO, check_ok, launch, tiny_config

from largelm.config import ConfigError, config_from_dict
from largelm.train.distill import distill_loss
from largelm.train.teacher import every_kth_layer_state


def test_distill_loss_parts():
    """At TP=1 in a one-rank parallel state (the loss is vocabulary-parallel, megatron's cross entropy)."""
    with single_rank_parallel_state():
        _check_distill_loss_parts()


def _check_distill_loss_parts():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g)
    labels = torch.randint(0, 10, (2, 5), generator=g)
    given = s.clone()
    total, kl, lm = distill_loss(s, s.clone(), labels, 0.7, 2.0, vocab_size=12)
    assert torch.equal(s, given)  # megatron's cross entropy works in place: not on the caller's logits
    assert kl.abs() < 1e-6 and torch.isclose(total, 0.3 * lm)
    torch.testing.assert_close(lm, F.cross_entropy(s.reshape(-1, 12), labels.reshape(-1)))
    total, kl, lm = distill_loss(s, t, labels, 0.25, 3.0, vocab_size=10)  # entries 10, 11 are "padding"
    p_t = torch.softmax(t[..., :10] / 3, -1)
    expected = (p_t * (p_t.log() - torch.log_softmax(s[..., :10] / 3, -1))).sum(-1).mean() * 9
    torch.testing.assert_close(kl, expected)
    torch.testing.assert_close(total, 0.25 * kl + 0.75 * lm)
    t2 = t.clone()
    t2[..., 10:] += 100.0  # the teacher's padded logits do not enter the KL
    torch.testing.assert_close(distill_loss(s, t2, labels, 0.25, 3.0, 10)[1], kl)


def test_every_kth_layer_mapping():
    teacher = {"embedding.word_embeddings.weight": torch.zeros(1), "decoder.final_layernorm.weight": torch.zeros(1)}
    for i in range(6):
        teacher[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.full((1,), float(i))
    student = every_kth_layer_state(teacher, num_layers=3, k=2)
    assert {k: float(v) for k, v in student.items() if k.startswith("decoder.layers")} == {
        "decoder.layers.0.mlp.linear_fc1.weight": 0.0, "decoder.layers.1.mlp.linear_fc1.weight": 2.0,
        "decoder.layers.2.mlp.linear_fc1.weight": 4.0}
    assert "embedding.word_embeddings.weight" in student and "decoder.final_layernorm.weight" in student


def _raw(tmp_path, tokenizer_path, shard_dir, seq, **sections) -> dict:
    return yaml.safe_load(tiny_config(tmp_path, tokenizer_path, shard_dir, seq, **sections).read_text())


def test_config_refuses_unsupported_layouts(tmp_path, tokenizer_path, shard_dir, shard_seq_length):
    raw = _raw(tmp_path, tokenizer_path, shard_dir, shard_seq_length)
    raw["distill"] = {"teacher": str(tmp_path / "t"), "alpha": 0.5}
    config_from_dict(raw)
    config_from_dict({**raw, "parallel": {"tensor_parallel": 2, "zero_stage": 3}})  # sharded teacher and student
    config_from_dict({**raw, "parallel": {"pipeline_parallel": 2, "zero_stage": 1}})  # teacher pipelined alongside
    with pytest.raises(ConfigError, match=r"distill: distillation supports model\.arch='gpt' or 'bert'"):
        config_from_dict({**raw, "model": {**raw["model"], "arch": "moe"}})
    with pytest.raises(ConfigError, match="distill.alpha"):
        config_from_dict({**raw, "distill": {"teacher": "x", "alpha": 1.5}})
    with pytest.raises(ConfigError, match="distill.student_init"):
        config_from_dict({**raw, "distill": {"teacher": "x", "student_init": "copy"}})


def test_preflight_names_a_missing_or_mismatched_teacher(tmp_path, tokenizer_path, shard_dir, shard_seq_length):
    from largelm.train.preflight import preflight

    raw = _raw(tmp_path, tokenizer_path, shard_dir, shard_seq_length)
    raw["distill"] = {"teacher": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError, match="distill.teacher: checkpoint .*nowhere does not exist"):
        preflight(config_from_dict(raw), 1)


def test_teacher_with_another_tokenizer_of_the_same_size_is_refused(tmp_path, corpus_dir, small_corpus,
                                                                     tokenizer_path, shard_dir, shard_seq_length):
    """Equal vocab sizes are not enough: the teacher's tokenizer.model file (config.yaml) must be the student's."""
    from largelm.prepare.tokenizer import train_tokenizer
    from largelm.tokenizer import Tokenizer
    from largelm.train.teacher import check_teacher

    vocab = Tokenizer.load(tokenizer_path).vocab_size
    small_sources = {json.loads(line)["source"] for line in small_corpus.read_text().splitlines()}
    other_text = tmp_path / "other.jsonl"  # other works of the corpus than the student tokenizer's
    records = [r for r in map(json.loads, (corpus_dir / "corpus.jsonl").read_text().splitlines())
               if r["source"] not in small_sources][:6]
    other_text.write_text("".join(json.dumps({"text": r["text"][:30000]}) + "\n" for r in records))
    other = train_tokenizer([other_text], tmp_path / "other.model", vocab_size=vocab)
    assert other.vocab_size == vocab and other.sha256 != Tokenizer.load(tokenizer_path).sha256

    raw = _raw(tmp_path, tokenizer_path, shard_dir, shard_seq_length)
    raw["model"]["vocab_size"] = vocab
    raw["distill"] = {"teacher": str(tmp_path / "teacher")}
    student = config_from_dict(raw)
    teacher_path = tmp_path / "teacher" / "step_00000002"

    def teacher(tokenizer):
        return config_from_dict({**raw, "tokenizer": {"model": str(tokenizer)}})

    with pytest.raises(ConfigError, match=rf"{teacher_path} was trained with tokenizer .*other\.model .*student's "
                                          rf"tokenizer\.model is {tokenizer_path}"):
        check_teacher(student, teacher(other.path), teacher_path)
    copy = tmp_path / "copy.model"  # the same tokenizer under another name is fine
    copy.write_bytes(Path(tokenizer_path).read_bytes())
    check_teacher(student, teacher(copy), teacher_path)
    with pytest.warns(UserWarning, match=r"tokenizer\.model=.*gone\.model, which is not there.*cannot verify"):
        check_teacher(student, teacher(tmp_path / "gone.model"), teacher_path)
    # checkpoints record the tokenizer's sha256 (Trainer): that decides, wherever the file is now
    teacher_path.mkdir(parents=True)
    for recorded, same in ((other.sha256, False), (Tokenizer.load(tokenizer_path).sha256, True)):
        files = {"config.yaml": {"sha256": "0" * 64, "bytes": 0}}
        (teacher_path / "manifest.json").write_text(json.dumps({"files": files, "tokenizer_sha256": recorded}))
        if same:
            check_teacher(student, teacher(tmp_path / "gone.model"), teacher_path)  # no warning: verified
        else:
            with pytest.raises(ConfigError, match=r"the tokenizer its manifest records \(.*gone\.model at the "):
                check_teacher(student, teacher(tmp_path / "gone.model"), teacher_path)


def _save_teacher(cfg, root):
    from largelm.checkpoint.manager import CheckpointManager
    from largelm.config import dump_config
    from largelm.train.step import DenseStep

    step = DenseStep(cfg, 1)
    from largelm.data import build_loader

    loader = build_loader(datasets=[(s.path, 1.0) for s in cfg.data.train], seq_length=cfg.model.seq_length,
                          batch_size=4, rank=0, world_size=1, num_workers=0, shuffle_buffer=0, seed=0,
                          infinite=True)
    batches = iter(loader)
    for _ in range(2):
        step.train_step(batches)
    meta = {"world_size": 1, "tensor_parallel": 1, "pipeline_parallel": 1, "zero_stage": cfg.parallel.zero_stage}
    CheckpointManager(root, config_yaml=dump_config(cfg), meta=meta).save(step.engine, 2, {"step": 2})
    return {k: v.detach().clone() for k, v in step.engine.module.state_dict().items() if isinstance(v, torch.Tensor)}


def test_distill_step_in_process(tmp_path, tokenizer_path, shard_dir, shard_seq_length, monkeypatch):
    """A real distillation step (DenseStep + DistillLoss): teacher read from a DeepSpeed ZeRO-2
    checkpoint, frozen; student initialised from teacher layers 0 and 2, built with train.activation_checkpointing
    (full recompute here; the teacher runs without grad and gets none); a step trains the student only and reports
    both loss parts."""
    from largelm.parallel.cpu_compat import model_parallel_manual_seed
    from largelm.tokenizer import Tokenizer
    from largelm.train.step import build_step

    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it (normally set by the launcher)
    vocab = Tokenizer.load(tokenizer_path).vocab_size
    raw = _raw(tmp_path, tokenizer_path, shard_dir, shard_seq_length,
               train={"steps": 4, "grad_accum_steps": 1, "micro_batch_size": 4, "precision": "fp32", "seed": 1})
    raw["model"].update(num_layers=4, vocab_size=vocab)
    teacher_cfg = config_from_dict(raw)
    student_raw = {**raw, "model": {**raw["model"], "num_layers": 2},
                   "train": {**raw["train"], "activation_checkpointing": "full"},
                   "distill": {"teacher": str(tmp_path / "teacher"), "alpha": 0.6, "temperature": 2.0,
                               "student_init": "every_kth_layer", "k": 2, "teacher_precision": "fp32"}}
    cfg = config_from_dict(student_raw)
    with single_rank_parallel_state():
        model_parallel_manual_seed(1)
        teacher_state = _save_teacher(teacher_cfg, tmp_path / "teacher")
        step = build_step(cfg, 1)  # a DenseStep with the distillation loss
        teacher = step.loss.teacher
        assert step.engine.module.config.recompute_granularity == "full"
        assert step.engine.module.config.recompute_method == "uniform"
        assert teacher.config.recompute_granularity is None
        student = step.engine.module.state_dict()
        torch.testing.assert_close(student["decoder.layers.1.self_attention.linear_qkv.weight"],
                                   teacher_state["decoder.layers.2.self_attention.linear_qkv.weight"])
        torch.testing.assert_close(teacher.state_dict()["decoder.layers.3.mlp.linear_fc2.weight"],
                                   teacher_state["decoder.layers.3.mlp.linear_fc2.weight"])
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        before_t = {k: v.clone() for k, v in teacher.state_dict().items() if isinstance(v, torch.Tensor)}
        before_s = student["decoder.layers.0.mlp.linear_fc1.weight"].clone()

        from largelm.data import build_loader

        loader = build_loader(datasets=[(s.path, 1.0) for s in cfg.data.train], seq_length=cfg.model.seq_length,
                              batch_size=4, rank=0, world_size=1, num_workers=0, shuffle_buffer=0, seed=0,
                              infinite=True)
        batches = iter(loader)
        total = step.train_step(batches).item()
        m = step.last_metrics
        assert set(m) == {"distill/kl", "distill/lm_loss"} and m["distill/kl"] > 0
        assert math.isclose(total, 0.6 * m["distill/kl"] + 0.4 * m["distill/lm_loss"], rel_tol=1e-5)
        step.train_step(batches)
        assert not torch.equal(step.engine.module.state_dict()["decoder.layers.0.mlp.linear_fc1.weight"], before_s)
        for k, v in teacher.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, before_t[k]), f"teacher weight {k} changed"
        assert math.isfinite(step.eval_loss(next(batches)).item())


@pytest.mark.slow
def test_distill_tool_through_launcher(tmp_path, tokenizer_path, shard_dir, shard_seq_length):
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    teacher = tiny_config(teacher_dir, tokenizer_path, shard_dir, shard_seq_length,
                          model={"num_layers": 4}, train={"steps": 4, "log_interval": 2})
    check_ok(launch(teacher, nproc=1))
    student = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length,
                          train={"steps": 2, "log_interval": 2, "precision": "bf16"})  # bf16: slow without AVX512_BF16
    out = run_distill_tool(student, teacher_dir / "ckpt", "--alpha", "0.5", "--temperature", "2", "--student-init",
                           "every_kth_layer", "--k", "2", timeout=900)
    assert " kl " in out and " lm_loss " in out, out[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "distill/kl" in tags and "distill/lm_loss" in tags, tags
    assert len(acc.Scalars("distill/kl")) == 2  # one per step
    saved = yaml.safe_load(next((tmp_path / "ckpt").glob("step_*/config.yaml")).read_text())
    assert saved["distill"]["student_init"] == "every_kth_layer"


def test_distill_cli_builds_the_launch_command():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from distill import build_argv
    finally:
        sys.path.pop(0)
    argv = build_argv(["--config", "c.yaml", "--teacher", "runs/t/checkpoints", "--alpha", "0.3",
                       "--student-init", "every_kth_layer", "--k", "3", "--nproc", "2", "train.steps=5"])
    assert argv[:6] == ["--config", "c.yaml", "--nproc", "2", "--launcher", "deepspeed"]
    rest = argv[argv.index("--") + 1:]
    assert rest == ["distill.teacher=runs/t/checkpoints", "distill.alpha=0.3", "distill.student_init=every_kth_layer",
                    "distill.k=3", "train.steps=5"]
    bert = build_argv(["--config", "c.yaml", "--teacher", "t", "--hidden-weight", "1", "--hidden-projection"])
    assert bert[bert.index("--") + 1:] == ["distill.teacher=t", "distill.hidden_weight=1.0",
                                           "distill.hidden_projection=True"]

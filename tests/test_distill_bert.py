"""BERT knowledge distillation (largelm/train/distill_bert.py, tools/distill.py with a BERT teacher).

Fast: the loss parts against a float64 reference written from the formula, config/teacher refusals, and real
distillation steps in a one-rank process (teacher trained and saved by a real DeepSpeed engine +
``CheckpointManager``): every_kth_layer init copies the right BERT tensors; a student equal to its teacher has KL 0
and no hidden/attention difference; a step trains the student only. Slow: tools/distill.py through the launcher
(2 ranks DP, ZeRO-1) on a BERT teacher trained in the test, the metrics in tensorboard, and the exported student
opened by transformers' ``BertForMaskedLM``.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from distill_utils import run_distill_tool
from mp_utils import single_rank_parallel_state
from train_utils import check_ok, launch, tiny_config

from largelm.config import ConfigError, config_from_dict
from largelm.convert import api
from largelm.model.layout import VOCAB_PARALLEL
from largelm.model.registry import get_arch
from largelm.train.distill_bert import attention_alignment, hidden_alignment, masked_kl
from largelm.train.teacher import aligned_layers, check_teacher, every_kth_layer_state

EPS32 = torch.finfo(torch.float32).eps


def _kl_reference(s, t, labels, temperature, vocab):
    """float64, position by position, straight from the definition."""
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if labels[b, i] == -100:
                continue
            p_t = torch.softmax(t[b, i, :vocab].double() / temperature, -1)
            p_s = torch.softmax(s[b, i, :vocab].double() / temperature, -1)
            total += float((p_t * (p_t / p_s).log()).sum())
            count += 1
    return total / count * temperature**2


@pytest.mark.numerics
def test_bert_loss_parts_match_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    b, seq, vocab, padded, h, heads = 3, 7, 20, 24, 16, 2
    s, t = torch.randn(b, seq, padded, generator=g) * 3, torch.randn(b, seq, padded, generator=g) * 3
    labels = torch.randint(0, vocab, (b, seq), generator=g)
    labels[torch.rand(b, seq, generator=g) < 0.6] = -100
    labels[0, 0] = 5
    t_pad = t.clone()
    t_pad[..., vocab:] += 50.0  # padded vocabulary entries do not enter the KL
    t_unmasked = t.clone()
    t_unmasked[labels == -100] += torch.randn(int((labels == -100).sum()), padded, generator=g)
    with single_rank_parallel_state():  # the vocabulary-parallel KL's TP group (of one rank here)
        kl = masked_kl(s, t, labels, 2.0, vocab)
        ref = _kl_reference(s, t, labels, 2.0, vocab)
        # fp32 log-softmax and a sum of `vocab` terms per position, averaged over <= b*seq positions
        assert abs(kl.item() - ref) <= 4 * EPS32 * (vocab + b * seq) * max(1.0, abs(ref))
        assert masked_kl(s, t_pad, labels, 2.0, vocab) == kl and masked_kl(s, t_unmasked, labels, 2.0, vocab) == kl
        assert masked_kl(s, s.clone(), labels, 2.0, vocab).abs() <= 4 * EPS32 * vocab

    mask = torch.ones(b, seq, dtype=torch.long)
    mask[1, 4:] = 0
    hs = [torch.randn(seq, b, h, generator=g) for _ in range(2)]
    ht = [torch.randn(seq, b, h, generator=g) for _ in range(2)]
    cos_ref, mse_ref, n = 0.0, 0.0, int(mask.sum())
    for x, y in zip(hs, ht):
        for bi in range(b):
            for i in range(seq):
                if mask[bi, i]:
                    u, v = x[i, bi].double(), y[i, bi].double()
                    cos_ref += float(1 - u @ v / (u.norm() * v.norm())) / n / 2
                    mse_ref += float(((u - v) ** 2).mean()) / n / 2
    tol = 4 * EPS32 * (h + b * seq)
    assert abs(hidden_alignment(hs, ht, mask, "cosine").item() - cos_ref) <= tol * max(1, cos_ref)
    assert abs(hidden_alignment(hs, ht, mask, "mse").item() - mse_ref) <= tol * max(1, mse_ref)
    both = hidden_alignment(hs, ht, mask, "cosine+mse").item()
    assert abs(both - cos_ref - mse_ref) <= tol * max(1, cos_ref + mse_ref)
    assert hidden_alignment(hs, [x.clone() for x in hs], mask, "cosine+mse").abs() <= tol

    ps = [torch.softmax(torch.randn(b, heads, seq, seq, generator=g), -1) for _ in range(2)]
    pt = [torch.softmax(torch.randn(b, heads, seq, seq, generator=g), -1) for _ in range(2)]
    att_ref, rows = 0.0, int(mask.sum()) * heads
    for x, y in zip(ps, pt):
        for bi in range(b):
            keep = mask[bi].bool()
            diff = (x[bi].double() - y[bi].double())[:, keep][:, :, keep]
            att_ref += float((diff**2).sum()) / rows / 2
    assert abs(attention_alignment(ps, pt, mask).item() - att_ref) <= 4 * EPS32 * seq * seq * b * att_ref


def test_every_kth_layer_uses_bert_parameter_names():
    prefix = get_arch("bert").layer_prefix
    teacher = {"embedding.word_embeddings.weight": torch.zeros(1), "encoder.final_layernorm.weight": torch.zeros(1),
               "lm_head.dense.weight": torch.zeros(1), "binary_head.weight": torch.zeros(1),
               "pooler.dense.weight": torch.zeros(1)}
    for i in range(6):
        teacher[f"encoder.layers.{i}.mlp.linear_fc1.weight"] = torch.full((1,), float(i))
    student = every_kth_layer_state(teacher, num_layers=2, k=3, layer_prefix=prefix)
    assert {k: float(v) for k, v in student.items() if k.startswith(prefix)} == {
        "encoder.layers.0.mlp.linear_fc1.weight": 0.0, "encoder.layers.1.mlp.linear_fc1.weight": 3.0}
    assert {k for k in student if not k.startswith(prefix)} == {k for k in teacher if not k.startswith(prefix)}


def _bert_raw(tmp_path, tokenizer_path, bert_shards, **model) -> dict:
    path = tiny_config(tmp_path, tokenizer_path, bert_shards, 64,
                       model={"arch": "bert", "num_layers": 4, "seq_length": 64, **model},
                       bert={"objective": "sop", "residual_post_layernorm": True},
                       train={"steps": 4, "grad_accum_steps": 1, "micro_batch_size": 4, "seed": 1})
    return yaml.safe_load(path.read_text())


def test_config_and_teacher_refusals(tmp_path, tokenizer_path, bert_shards):
    raw = _bert_raw(tmp_path, tokenizer_path, bert_shards, vocab_size=1000)
    teacher = config_from_dict(raw)
    distill = {"teacher": str(tmp_path / "t"), "hidden_weight": 1.0}

    def student(model=None, train=None, **d):
        return config_from_dict({**raw, "model": {**raw["model"], **(model or {})},
                                 "train": {**raw["train"], **(train or {})}, "distill": {**distill, **d}})

    assert aligned_layers(student(model={"num_layers": 2})) == [(0, 1), (1, 3)]
    assert aligned_layers(student(layer_map=[[0, 0], [1, 2]])) == [(0, 0), (1, 2)]
    with pytest.raises(ConfigError, match="distill.layer_map: student layer 2 does not exist"):
        student(model={"num_layers": 2}, layer_map=[[2, 3]])
    with pytest.raises(ConfigError, match="distill.layer_map: a student layer appears twice"):
        student(layer_map=[[0, 1], [0, 2]])
    with pytest.raises(ConfigError, match="distill.hidden_loss"):
        student(hidden_loss="l1")
    with pytest.raises(ConfigError, match="distill.hidden_weight: .*activation_checkpointing"):
        student(train={"activation_checkpointing": "selective"})
    gpt = {**raw, "model": {k: v for k, v in raw["model"].items() if k != "arch"}, "bert": None}
    with pytest.raises(ConfigError, match="distill.attention_weight: layer alignment .* model.arch='bert'"):
        config_from_dict({**gpt, "distill": {"teacher": "t", "attention_weight": 0.5}})
    path = tmp_path / "t" / "step_00000001"
    with pytest.raises(ConfigError, match="distill.hidden_weight: .*hidden_size \\(32\\) to equal the teacher's "
                                          ".*set distill.hidden_projection true"):
        check_teacher(student(model={"hidden_size": 32}), teacher, path)
    check_teacher(student(model={"hidden_size": 32, "num_layers": 2}, hidden_projection=True), teacher, path)  # W_h
    with pytest.raises(ConfigError, match="distill.hidden_projection: .*distill.hidden_weight > 0"):
        student(hidden_weight=0, hidden_projection=True)
    with pytest.raises(ConfigError, match="distill.attention_weight: .*num_attention_heads \\(2\\)"):
        check_teacher(student(model={"num_attention_heads": 2}, hidden_weight=0, attention_weight=1), teacher, path)
    with pytest.raises(ConfigError, match="student layer 2 is aligned with teacher layer 5 .* has 4 layers"):
        check_teacher(student(model={"num_layers": 3}, k=2), teacher, path)
    with pytest.raises(ConfigError, match="bert.binary_head: teacher True vs student False"):
        check_teacher(config_from_dict({**raw, "model": {**raw["model"], "num_layers": 2},
                                        "bert": {**raw["bert"], "binary_head": False},
                                        "distill": {"teacher": "t", "student_init": "every_kth_layer"}}),
                      teacher, path)
    with pytest.raises(ConfigError, match="model.arch='gpt' checkpoint, the student is model.arch='bert'"):
        check_teacher(student(), config_from_dict(gpt), path)


def train_and_save_teacher(cfg, root, steps=2) -> dict:
    """A real DenseStep trained ``steps`` steps and saved by ``CheckpointManager``; returns its weights."""
    from largelm.checkpoint.manager import CheckpointManager
    from largelm.config import dump_config
    from largelm.parallel.cpu_compat import model_parallel_manual_seed
    from largelm.train.step import DenseStep

    model_parallel_manual_seed(cfg.train.seed)
    step = DenseStep(cfg, 1)
    batches = _batches(cfg)
    for _ in range(steps):
        step.train_step(batches)
    meta = {"world_size": 1, "tensor_parallel": 1, "pipeline_parallel": 1, "zero_stage": cfg.parallel.zero_stage}
    CheckpointManager(root, config_yaml=dump_config(cfg), meta=meta).save(step.engine, steps, {"step": steps})
    return {k: v.detach().clone() for k, v in step.engine.module.state_dict().items() if isinstance(v, torch.Tensor)}


def _batches(cfg):
    from largelm.data import build_loader

    arch = get_arch(cfg.model.arch)
    return iter(build_loader(datasets=[(s.path, 1.0) for s in cfg.data.train], seq_length=cfg.model.seq_length,
                             batch_size=cfg.train.micro_batch_size, rank=0, world_size=1, num_workers=0,
                             shuffle_buffer=0, seed=0, infinite=True, **arch.loader_kwargs(cfg)))


@pytest.mark.numerics
def test_bert_distill_steps_in_process(tmp_path, tokenizer_path, bert_shards, monkeypatch):
    """Teacher (4 layers, trained 2 steps, saved) -> (a) a 4-layer student initialised from it with k=1 (= the
    teacher: no dropout here) has KL 0 and no hidden or attention difference; (b) a 2-layer every_kth_layer student
    (k=2) holds teacher layers 0 and 2 and all the other tensors, and a step changes the student, not the teacher,
    with every loss part reported."""
    from largelm.tokenizer import Tokenizer
    from largelm.train.step import build_step

    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it (normally set by the launcher)
    raw = _bert_raw(tmp_path, tokenizer_path, bert_shards, vocab_size=Tokenizer.load(tokenizer_path).vocab_size)
    distill = {"teacher": str(tmp_path / "teacher"), "alpha": 1.0, "temperature": 2.0, "student_init":
               "every_kth_layer", "k": 1, "teacher_precision": "fp32", "hidden_weight": 1.0,
               "hidden_loss": "cosine+mse", "attention_weight": 1.0, "layer_map": [[0, 0], [3, 3]]}
    with single_rank_parallel_state():
        teacher_state = train_and_save_teacher(config_from_dict(raw), tmp_path / "teacher")

        same = build_step(config_from_dict({**raw, "distill": distill}), 1)
        batch = next(_batches(same.cfg))
        same.engine.train()
        out = same.loss(same.engine, batch)
        n = batch["attention_mask"].shape[1]
        # identical weights and inputs: equal up to the order of fp32 reductions
        assert out["kl"].abs() <= 8 * EPS32 * same.cfg.model.vocab_size
        assert out["hidden"].abs() <= 8 * EPS32 * same.cfg.model.hidden_size
        assert out["attention"].abs() <= (8 * EPS32) ** 2 * n  # squared differences of probabilities, n keys
        assert math.isclose(out["loss"].item(), out["kl"].item() + out["hidden"].item() + out["attention"].item(),
                            rel_tol=1e-6, abs_tol=1e-6)
        del same

        cfg = config_from_dict({**raw, "model": {**raw["model"], "num_layers": 2},
                                "distill": {**distill, "alpha": 0.5, "k": 2, "layer_map": "every_kth_layer"}})
        step = build_step(cfg, 1)
        student = step.engine.module.state_dict()
        for name, tensor in teacher_state.items():
            if name.endswith("_extra_state"):
                continue
            if name.startswith("encoder.layers."):
                index, rest = name[len("encoder.layers."):].split(".", 1)
                if int(index) % 2 == 0:
                    assert torch.equal(student[f"encoder.layers.{int(index) // 2}.{rest}"], tensor), name
            elif name in VOCAB_PARALLEL:  # the teacher's real rows; its padding rows are read as zeros (tp_slice)
                vocab = cfg.model.vocab_size
                assert torch.equal(student[name][:vocab], tensor[:vocab]) and not student[name][vocab:].any(), name
            else:
                assert torch.equal(student[name], tensor), name
        teacher = step.loss.teacher
        before_t = {k: v.clone() for k, v in teacher.state_dict().items() if isinstance(v, torch.Tensor)}
        before_s = student["encoder.layers.1.mlp.linear_fc1.weight"].clone()
        batches = _batches(cfg)
        total = step.train_step(batches).item()
        m = step.last_metrics
        assert set(m) == {"distill/kl", "distill/mlm_loss", "distill/mlm_acc", "distill/sop_loss", "distill/sop_acc",
                          "distill/hidden", "distill/attention"}
        assert m["distill/kl"] > 0 and m["distill/hidden"] > 0 and m["distill/attention"] > 0
        expected = (0.5 * m["distill/kl"] + 0.5 * (m["distill/mlm_loss"] + m["distill/sop_loss"])
                    + m["distill/hidden"] + m["distill/attention"])
        assert math.isclose(total, expected, rel_tol=1e-5)
        step.train_step(batches)
        assert not torch.equal(step.engine.module.state_dict()["encoder.layers.1.mlp.linear_fc1.weight"], before_s)
        for k, v in teacher.state_dict().items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, before_t[k]), f"teacher weight {k} changed"
        assert math.isfinite(step.eval_loss(next(batches)).item())
        assert set(step.last_eval_metrics) >= {"valid/mlm_loss", "valid/sop_loss"}  # the plain BERT loss


@pytest.mark.slow
def test_bert_distill_tool_end_to_end_and_export(tmp_path, tokenizer_path, bert_shards):
    """tools/distill.py: a BERT teacher trained here (1 rank) -> a 2-layer student (2 ranks DP, ZeRO-1, hidden and
    attention alignment) -> loss parts in the step lines and tensorboard -> largelm-convert export-hf of the
    student opens as BertForMaskedLM and predicts what the student predicts; and the same tool with a PP=2 student
    (the teacher pipelined beside it, alignment per stage) trains and its checkpoint exports."""
    teacher_dir = tmp_path / "teacher"
    teacher_dir.mkdir()
    common = dict(bert={"objective": "sop", "residual_post_layernorm": True}, parallel={"zero_stage": 1})
    model = {"arch": "bert", "seq_length": 64}
    teacher = tiny_config(teacher_dir, tokenizer_path, bert_shards, 64, model={**model, "num_layers": 4},
                          train={"steps": 4, "log_interval": 2, "grad_accum_steps": 1}, **common)
    check_ok(launch(teacher, nproc=1))
    student = tiny_config(tmp_path, tokenizer_path, bert_shards, 64, model={**model, "num_layers": 2},
                          train={"steps": 3, "log_interval": 1, "grad_accum_steps": 1},
                          checkpoint={"dir": str(tmp_path / "ckpt"), "save_interval": 3, "keep_last": 1}, **common)
    out = run_distill_tool(student, teacher_dir / "ckpt", "--alpha", "0.5", "--temperature", "2", "--student-init",
                           "every_kth_layer", "--k", "2", "--hidden-weight", "1", "--attention-weight", "1")
    assert " kl " in out and " mlm_loss " in out and " hidden " in out, out[-3000:]
    # the same student pipeline-parallel (PP=2 on the 2 ranks, the teacher pipelined beside it), from the tool
    pp_dir = tmp_path / "pp"
    pp_dir.mkdir()
    pp_student = tiny_config(pp_dir, tokenizer_path, bert_shards, 64, model={**model, "num_layers": 2},
                             train={"steps": 2, "log_interval": 1, "grad_accum_steps": 2},
                             checkpoint={"dir": str(pp_dir / "ckpt"), "save_interval": 2, "keep_last": 1}, **common)
    pp_out = run_distill_tool(pp_student, teacher_dir / "ckpt", "--student-init", "every_kth_layer", "--k", "2",
                              "--hidden-weight", "1", "--attention-weight", "1",
                              overrides=("parallel.pipeline_parallel=2",))
    assert "step 2/2" in pp_out and " kl " in pp_out and " hidden " in pp_out, pp_out[-3000:]
    [pp_check] = api.export_hf(pp_dir / "ckpt", pp_dir / "hf", log=lambda *_: None)
    assert pp_check.ok, pp_check  # a PP=2 student checkpoint exports (consolidated on the way)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("distill/kl", "distill/mlm_loss", "distill/sop_loss", "distill/hidden", "distill/attention"):
        assert len(acc.Scalars(tag)) == 3, (tag, tags)

    from transformers import BertForMaskedLM

    from largelm.convert import verify

    [check] = api.export_hf(tmp_path / "ckpt", tmp_path / "hf", log=lambda *_: None)
    assert check.ok, check  # export's own check: transformers' logits = the student's (fp32 rounding)
    hf = BertForMaskedLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert hf.config.num_hidden_layers == 2
    saved = yaml.safe_load(next((tmp_path / "ckpt").glob("step_*/config.yaml")).read_text())
    tokens = verify.fixed_tokens(config_from_dict(saved).model)
    types, mask = verify.bert_inputs(tokens)
    with torch.no_grad():
        logits = hf(input_ids=tokens, token_type_ids=types, attention_mask=mask).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == saved["model"]["vocab_size"]

"""BERT distillation's learned hidden-state projection (``distill.hidden_projection``, TinyBERT's W_h;
largelm/train/distill_bert.py ``attach_hidden_projection``).

* (fast) the hidden-state loss through the projection, and its gradient in W, against a float64 evaluation of the
  formula (student hidden 24 -> teacher hidden 40);
* (slow) a student of hidden size 32 distilled from a hidden-64 teacher on 2 data-parallel ranks with ZeRO-3: the
  loss falls and the projection (a parameter of the student, partitioned by ZeRO like the others) changes; a
  checkpoint after 3 steps resumed in a fresh engine gives bit-identical losses and gradient norms for 2 steps;
  the checkpoint holds the projection, and ``largelm-convert export-hf`` of it gives a ``BertForMaskedLM`` without
  it (export's own logit check passes).
The TP=2 (+SP) runs with the projection: tests/test_distill_bert_tp.py.
"""

from __future__ import annotations

import deepspeed
import pytest
import torch
from mp_utils import run_ranks, single_rank_parallel_state
from test_distill_bert_tp import MICRO, masked_batches, random_bert, raw_config, save_teacher
from tolerances import K_F64, f64_bound

from largelm.config import config_from_dict
from largelm.train.distill_bert import hidden_alignment

STEPS, RESUMED = 4, 2  # train 4 steps; the checkpoint is taken after 2


def _reference(hs, ht, mask, weight) -> torch.Tensor:
    """float64, token by token: mean over layer pairs and real tokens of 1 - cos(W h_s, h_t) + mean((W h_s - h_t)^2)."""
    total, n = 0, int(mask.sum())
    for x, y in zip(hs, ht):
        for b in range(mask.shape[0]):
            for i in range(mask.shape[1]):
                if mask[b, i]:
                    u, v = weight @ x[i, b], y[i, b]
                    total = total + (1 - u @ v / (u.norm() * v.norm()) + ((u - v) ** 2).mean()) / n / len(hs)
    return total


@pytest.mark.numerics
def test_projected_hidden_loss_matches_float64():
    g = torch.Generator().manual_seed(0)
    seq, b, hs_dim, ht_dim = 6, 3, 24, 40
    mask = torch.ones(b, seq, dtype=torch.long)
    mask[2, 3:] = 0
    hs = [torch.randn(seq, b, hs_dim, generator=g) for _ in range(2)]
    ht = [torch.randn(seq, b, ht_dim, generator=g) for _ in range(2)]
    projection = torch.nn.Linear(hs_dim, ht_dim, bias=False)
    with torch.no_grad():
        projection.weight.copy_(torch.randn(ht_dim, hs_dim, generator=g) / hs_dim**0.5)
    loss = hidden_alignment(hs, ht, mask, "cosine+mse", projection)
    loss.backward()
    weight64 = projection.weight.detach().double().requires_grad_()
    exact = _reference([x.double() for x in hs], [y.double() for y in ht], mask, weight64)
    exact.backward()
    # the plain fp32 formula evaluated token by token: what the vectorised one must be as accurate as
    weight32 = projection.weight.detach().clone().requires_grad_()
    trusted = _reference(hs, ht, mask, weight32)
    trusted.backward()
    assert abs(loss.item() - exact.item()) <= K_F64 * abs(trusted.item() - exact.item()) + 8 * 2**-24 * exact.item()
    assert (projection.weight.grad.double() - weight64.grad).abs().max() <= f64_bound(weight32.grad, weight64.grad)
    assert exact.item() > 0.5  # the projection matters: random states, far from aligned


def _projection(step) -> torch.Tensor:
    """The student's projection weight, gathered from its ZeRO-3 partitions (collective)."""
    weight = step.engine.module.distill_projection.weight
    with deepspeed.zero.GatheredParameters([weight], enabled=hasattr(weight, "ds_id")):
        return weight.detach().clone()


def _dp2_rank(rank, world_size, case):
    from largelm.checkpoint.manager import CheckpointManager, find_latest
    from largelm.config import dump_config
    from largelm.parallel import groups
    from largelm.parallel.cpu_compat import model_parallel_manual_seed
    from largelm.train.step import build_step

    groups.init_distributed()
    groups.init_model_parallel(1, 1)
    try:
        cfg = config_from_dict(case["raw"])
        batches = [{k: v[rank * (MICRO // 2):(rank + 1) * (MICRO // 2)] for k, v in b.items()}
                   for b in case["batches"]]
        accum = cfg.train.grad_accum_steps

        def run(step, first, last):
            losses, norms = [], []
            for s in range(first, last):
                losses.append(step.train_step(iter(batches[s * accum:(s + 1) * accum])).item())
                norms.append(float(step.engine.get_global_grad_norm()))
            return losses, norms

        torch.manual_seed(cfg.train.seed)
        model_parallel_manual_seed(cfg.train.seed)
        step = build_step(cfg, world_size)
        projection0 = _projection(step)
        losses, norms = run(step, 0, RESUMED)
        meta = {"world_size": world_size, "tensor_parallel": 1, "pipeline_parallel": 1,
                "zero_stage": cfg.parallel.zero_stage}
        manager = CheckpointManager(case["root"], config_yaml=dump_config(cfg), meta=meta)
        manager.save(step.engine, RESUMED, {})
        after, after_norms = run(step, RESUMED, STEPS)
        moved = (_projection(step) - projection0).abs().max().item()
        del step
        torch.manual_seed(123)  # a fresh engine from other random weights: everything must come from the checkpoint
        model_parallel_manual_seed(123)
        resumed = build_step(cfg, world_size)
        manager.load(resumed.engine, find_latest(manager.root))
        again, again_norms = run(resumed, RESUMED, STEPS)
        return dict(losses=losses + after, norms=norms + after_norms, resumed=again, resumed_norms=again_norms,
                    moved=moved)
    finally:
        groups.destroy()


@pytest.mark.slow
def test_projection_trains_resumes_exactly_and_is_not_exported(tmp_path, tokenizer_path, monkeypatch):
    from transformers import BertForMaskedLM

    from largelm.checkpoint.reader import load_pt
    from largelm.convert import api

    monkeypatch.setenv("LOCAL_RANK", "0")
    teacher = str(tmp_path / "teacher")
    with single_rank_parallel_state():
        teacher_cfg = config_from_dict({k: v for k, v in raw_config(tokenizer_path, teacher, "ref", 4).items()
                                        if k != "distill"})
        save_teacher(teacher_cfg, teacher, random_bert(teacher_cfg, seed=1))
    raw = raw_config(tokenizer_path, teacher, "ref-proj")
    raw["parallel"]["zero_stage"] = 3  # the projection is partitioned and gathered for its forward like the rest
    raw["train"].update(micro_batch_size=MICRO // 2, steps=STEPS)
    root = tmp_path / "student"
    per_rank = run_ranks(_dp2_rank, 2, dict(raw=raw, root=str(root), batches=masked_batches(STEPS)), timeout_s=300)
    for rank, res in enumerate(per_rank):
        assert res["losses"][-1] < res["losses"][0], f"rank {rank}: the loss did not fall: {res['losses']}"
        assert res["moved"] > 0, f"rank {rank}: the projection did not train"
        assert res["resumed"] == res["losses"][RESUMED:], f"rank {rank}: resumed {res['resumed']} vs {res['losses']}"
        assert res["resumed_norms"] == res["norms"][RESUMED:], f"rank {rank}: gradient norms after resume differ"
    saved = next(root.glob("step_*"))
    shapes = {k: tuple(v) for group in load_pt(saved / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
              for k, v in group.items()}
    assert shapes["distill_projection.weight"] == (64, 32)  # in the checkpoint (exact resume) ...
    [check] = api.export_hf(root, tmp_path / "hf", log=lambda *_: None)
    assert check.ok, check  # export's check: transformers' logits = the student's
    hf = BertForMaskedLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert hf.config.hidden_size == 32
    assert not [k for k in hf.state_dict() if "projection" in k]  # ... not in the exported student


def test_elastic_resume_of_a_projection_run_is_refused():
    """Elastic resume (another layout) rebuilds the engine from the model's resharded tensors, which leave the
    projection out: refused before any state is written (the check needs only the engine's parameter names)."""
    from types import SimpleNamespace

    from largelm.checkpoint.elastic import load_into_engine
    from largelm.errors import ConversionError

    student = torch.nn.Module()
    student.add_module("distill_projection", torch.nn.Linear(4, 8, bias=False))
    source = SimpleNamespace(info=SimpleNamespace(path="ckpt/step_00000002"))
    with pytest.raises(ConversionError, match="elastic resume .* distill.hidden_projection is not supported"):
        load_into_engine(SimpleNamespace(module=student), None, source, tp_rank=0)

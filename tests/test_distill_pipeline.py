"""Distillation with a pipeline-parallel GPT student and the teacher pipelined alongside (largelm/train/
distill_pipeline.py, largelm/model/pipeline_distill.py).

* PP=2 student + PP=2 teacher (teachers trained at PP=2 and at TP=2) on 2 ranks, and TP=2 x PP=2 (teacher trained
  at TP=2; and with sequence parallelism, teacher trained at PP=2) on 4 ranks, train exactly like the PP=1 (dense,
  ``DenseStep`` + ``DistillLoss``) pair from the same starting weights on the same micro-batches: per-step loss,
  ``distill/kl``, ``distill/lm_loss`` and global gradient norm. Each rank holds only its stage's TP shard of the
  teacher; validation is the plain LM loss.
* The PP=2 student's checkpoint holds only student parameters (its layer files, the optimizer's parameters), and a
  student resumed from it takes the next step exactly as the run that continued.
* ``student_init: every_kth_layer`` at PP=2: each stage's student layers are the teacher's layers i*k.
* ``tools/distill.py`` end to end at PP=2 with a bf16 teacher (its activation crosses as a uint8 view).
* (fast) BERT's hidden_projection at PP>1, a virtual pipeline, and a teacher whose layers do not split over PP are
  refused, naming the field; the teacher activation's integer view is bit-exact.

Tolerances (tests/tolerances.py): the layouts differ only in summation order (pipeline stages, micro-batch sums, the
TP split of matmuls and of the vocab-parallel softmax/KL), so every compared value may differ by ``sum_rtol`` of one
step's reduction chain: the student's forward and backward (``backward=True``: 2 layers, the 1024-way softmax, the
step's tokens) plus the teacher's forward (4 layers), whose logits enter the KL: 3.4e-5. Measured worst case over
the layouts and steps: 1.8e-7 (KL), 2.2e-7 (gradient norm); scaling one teacher layer's weights by 1.001 moves the
loss by 5e-5 and fails the test.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from distill_utils import VOCAB, random_gpt_state, run_distill_tool, write_teachers
from mp_utils import rel_diff, run_ranks, single_rank_parallel_state
from tolerances import chain_length, sum_rtol
from train_utils import tiny_config

from largelm.config import ConfigError, config_from_dict

TEACHER_LAYOUTS = {"pp2": (1, 2), "tp2": (2, 1)}  # (tensor, pipeline parallel) the teachers were trained at
STEPS, GRAD_ACCUM, MICRO = 3, 2, 2
SEQ = 32
# one step: the student's forward+backward chain over the step's tokens, plus the teacher's forward chain
STEP_CHAIN = (chain_length(layers=2, hidden=64, ffn=256, seq=SEQ, heads=4, vocab=1024, tokens=GRAD_ACCUM * MICRO * SEQ,
                           backward=True)
              + chain_length(layers=4, hidden=64, ffn=256, seq=SEQ, heads=4, vocab=1024))
RTOL = sum_rtol(STEP_CHAIN)
METRICS = ("losses", "kl", "lm_loss", "norms")


def _raw(tmp, tokenizer_path, shard_dir, **model) -> dict:
    path = tiny_config(tmp, tokenizer_path, shard_dir, SEQ, model={"tie_embeddings": False, "vocab_size": VOCAB,
                                                                   **model},
                       parallel={"zero_stage": 1}, train={"grad_accum_steps": GRAD_ACCUM, "micro_batch_size": MICRO,
                                                          "steps": STEPS + 1})
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path, shard_dir):
    """Teachers (4 layers) trained at PP=2 and TP=2, the 2-layer student's raw config and starting weights, the
    step's token batches, and the PP=1 reference run with each teacher."""
    tmp = tmp_path_factory.mktemp("pipeline_distill")
    (tmp / "t").mkdir()
    teacher_raw = _raw(tmp / "t", tokenizer_path, shard_dir, num_layers=4)
    teacher_state = random_gpt_state(config_from_dict(teacher_raw).model, seed=1)
    run_ranks(write_teachers, 2, teacher_raw, str(tmp / "teachers"), teacher_state, TEACHER_LAYOUTS, timeout_s=300)
    raw = _raw(tmp, tokenizer_path, shard_dir, num_layers=2)
    case = dict(raw=raw, root=str(tmp / "teachers"), student=random_gpt_state(config_from_dict(raw).model, seed=2),
                tokens=torch.randint(0, VOCAB, (STEPS + 1, GRAD_ACCUM, MICRO, SEQ + 1),
                                     generator=torch.Generator().manual_seed(3)),
                teacher=teacher_state)
    with single_rank_parallel_state(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it (normally set by the launcher)
        refs = {layout: _train(_cfg(case, layout, 1, 1), 1, case) for layout in TEACHER_LAYOUTS}
    return case, refs


def _cfg(case, teacher_layout: str, tp: int, pp: int, sp: bool = False, **distill):
    return config_from_dict({**case["raw"], "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp,
                                                         "sequence_parallel": sp, "zero_stage": 1},
                             "distill": {"teacher": f"{case['root']}/{teacher_layout}", "alpha": 0.6,
                                         "temperature": 2.0, "teacher_precision": "fp32", **distill}})


def _train(cfg, world_size, case, ckpt: str | None = None) -> dict:
    """``STEPS`` steps of ``build_step(cfg)`` from the case's student weights (every rank: the same micro-batches,
    DP=1), then one validation batch; with ``ckpt`` also the checkpoint and resume checks."""
    from largelm.parallel.cpu_compat import model_parallel_manual_seed
    from largelm.train.step import build_step

    torch.manual_seed(cfg.train.seed)
    model_parallel_manual_seed(cfg.train.seed)
    step = build_step(cfg, world_size, init_state_dict=case["student"])
    out = {k: [] for k in METRICS}
    for s in range(STEPS):
        out["losses"].append(step.train_step(iter(_micro(case, s))).item())
        out["kl"].append(step.last_metrics["distill/kl"])
        out["lm_loss"].append(step.last_metrics["distill/lm_loss"])
        out["norms"].append(float(step.engine.get_global_grad_norm()))
    out["metric_names"] = sorted(step.last_metrics)
    out["valid"] = step.eval_loss({"tokens": case["tokens"][STEPS, 0]}).item()
    out["valid_metrics"] = sorted(step.last_eval_metrics)
    if cfg.parallel.pipeline_parallel > 1:
        out.update(_stage_facts(step))
        out["layout_forward_loss"] = _layout_forward_loss(step, cfg, case["tokens"][STEPS, 0])
    if ckpt is not None:
        out.update(_save_and_resume(cfg, world_size, case, step, ckpt))
    return out


def _layout_forward_loss(step, cfg, tokens) -> float | None:
    """The LM loss of ``tokens`` from ``layout_forward`` (what in-training lm-eval runs: the student's stages
    alone, full-vocabulary logits on the last stage); None on other stages."""
    import torch.nn.functional as F

    from largelm.model.parallel_forward import layout_forward

    with torch.no_grad():
        logits = layout_forward(step.engine.module, tokens[:, :-1], cfg.model,
                                sequence_parallel=cfg.parallel.sequence_parallel)
    if logits is None:
        return None
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).item()


def _micro(case, s: int) -> list[dict]:
    return [{"tokens": case["tokens"][s, k]} for k in range(GRAD_ACCUM)]


def _stage_facts(step) -> dict:
    """What this rank holds: student and teacher parameter counts of its stage, the teacher's training mode."""
    module = step.engine.module
    teacher = module.teacher.module
    student_ids = {id(p) for p in module.parameters()}
    optimizer = step.engine.optimizer  # ZeRO-1: its bit16_groups are the module parameters it steps
    optimized = {id(p) for group in getattr(optimizer, "bit16_groups", None) or
                 [g["params"] for g in optimizer.param_groups] for p in group}
    return dict(teacher_numel=sum(p.numel() for p in teacher.parameters()),
                teacher_in_student=any(id(p) in student_ids | optimized for p in teacher.parameters()),
                teacher_trains=teacher.training or any(p.requires_grad for p in teacher.parameters()),
                teacher_sources=module.teacher_sources, stage=module.stage_id)


def _save_and_resume(cfg, world_size, case, step, root: str) -> dict:
    """Save after the run's steps; list what the layer files hold; resume a fresh student (random start) from the
    checkpoint and take one more step beside the run that continued."""
    import torch.distributed as dist

    from largelm.checkpoint.manager import CheckpointManager, find_latest
    from largelm.config import dump_config
    from largelm.train.step import build_step

    meta = {"world_size": world_size, "tensor_parallel": cfg.parallel.tensor_parallel,
            "pipeline_parallel": cfg.parallel.pipeline_parallel, "zero_stage": 1}
    manager = CheckpointManager(root, config_yaml=dump_config(cfg), meta=meta)
    saved = manager.save(step.engine, STEPS, {"step": STEPS})
    dist.barrier()
    layer_files = {}
    for path in sorted(saved.glob("layer_*-model_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        layer_files[path.name] = {k: int(v.numel()) for k, v in state.items() if not k.endswith("_extra_state")}
    resumed = build_step(cfg, world_size)  # random student: every weight must come from the checkpoint
    manager.load(resumed.engine, find_latest(root, checksums=False))
    batch = _micro(case, STEPS)
    continued = step.train_step(iter(batch)).item(), float(step.engine.get_global_grad_norm())
    again = resumed.train_step(iter(batch)).item(), float(resumed.engine.get_global_grad_norm())
    return dict(layer_files=layer_files, continued=continued, resumed=again,
                resumed_metrics=resumed.last_metrics == step.last_metrics)


def _pipeline_ranks(rank, world_size, case, runs):
    from megatron.core import parallel_state

    from largelm.parallel import groups

    groups.init_distributed()
    out = {}
    try:
        for name, (teacher_layout, tp, pp, ckpt) in runs.items():
            groups.init_model_parallel(tp, pp)
            out[name] = _train(_cfg(case, teacher_layout, tp, pp, sp=name.endswith("-sp")), world_size, case, ckpt)
            parallel_state.destroy_model_parallel()
        # student_init every_kth_layer at PP=2: this stage's student layer = teacher layer 2 x its index
        if world_size == 2:
            from largelm.train.distill_pipeline import build_distill_pipeline

            groups.init_model_parallel(1, 2)
            module = build_distill_pipeline(_cfg(case, "pp2", 1, 2, student_init="every_kth_layer", k=2))
            errs = {}
            for index in range(module._local_start, module._local_stop):
                layer = module.stage_layer(index)
                if 1 <= index <= 2:  # transformer layer index - 1 <- teacher layer 2 * (index - 1)
                    teacher_key = f"decoder.layers.{2 * (index - 1)}.mlp.linear_fc1.weight"
                    errs[teacher_key] = (layer.layer.mlp.linear_fc1.weight - case["teacher"][teacher_key]).abs().max()
                elif index == module.num_transformer_layers + 2:
                    errs["output_layer.weight"] = (layer.output_layer.weight
                                                   - case["teacher"]["output_layer.weight"]).abs().max()
            out["init_errs"] = {k: float(v) for k, v in errs.items()}
            parallel_state.destroy_model_parallel()
        return out
    finally:
        groups.destroy()


def _check_parity(name, per_rank, ref, teacher_numel_full):
    worst = {k: max(rel_diff(r[k][s], ref[k][s]) for r in per_rank for s in range(STEPS)) for k in METRICS}
    print(f"\n{name}: worst rel diff vs PP=1 " + " ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    for rank, res in enumerate(per_rank):
        for key in METRICS:
            for s in range(STEPS):
                assert rel_diff(res[key][s], ref[key][s]) < RTOL, \
                    f"{name} rank {rank} step {s + 1}: {key} {res[key][s]} vs PP=1 {ref[key][s]} (rtol {RTOL:.1e})"
        assert rel_diff(res["valid"], ref["valid"]) < RTOL, f"{name} rank {rank}: validation loss"
        if res["layout_forward_loss"] is not None:  # the student alone through layout_forward: the same LM loss
            assert rel_diff(res["layout_forward_loss"], ref["valid"]) < RTOL, f"{name} rank {rank}: layout_forward"
        assert res["metric_names"] == ["distill/kl", "distill/lm_loss"] == ref["metric_names"]
        assert res["valid_metrics"] == [] == ref["valid_metrics"]  # validation: the plain LM loss, as PP=1
        assert not res["teacher_in_student"] and not res["teacher_trains"], f"{name} rank {rank}"
        # this stage's share: 2 of 4 teacher layers plus an embedding or the head (half of it under TP=2)
        assert res["teacher_numel"] < 0.7 * teacher_numel_full, f"{name} rank {rank}: holds too much teacher"


@pytest.mark.slow
@pytest.mark.numerics
def test_pp2_student_with_pp2_teacher_matches_pp1_and_resumes(setup, tmp_path):
    """PP=2 student and teacher (teacher trained at PP=2, and one trained at TP=2) vs the PP=1 pair; checkpoint
    holds the student only and resumes exactly; student_init every_kth_layer per stage."""
    case, refs = setup
    runs = {"pp2": ("pp2", 1, 2, str(tmp_path / "ckpt")), "pp2-tp2teacher": ("tp2", 1, 2, None)}
    per_rank = run_ranks(_pipeline_ranks, 2, case, runs, timeout_s=300)
    full = sum(v.numel() for v in case["teacher"].values())
    _check_parity("PP=2", [r["pp2"] for r in per_rank], refs["pp2"], full)
    _check_parity("PP=2, TP=2-trained teacher", [r["pp2-tp2teacher"] for r in per_rank], refs["tp2"], full)
    for rank, res in enumerate(per_rank):
        assert res["pp2"]["teacher_sources"] == [0] and res["pp2-tp2teacher"]["teacher_sources"] == [0, 1]
        assert res["pp2"]["continued"] == res["pp2"]["resumed"], f"rank {rank}: resumed step differs"
        assert res["pp2"]["resumed_metrics"], f"rank {rank}: resumed step's distill metrics differ"
        assert all(e == 0.0 for e in res["init_errs"].values()), f"rank {rank}: every_kth_layer: {res['init_errs']}"
    # the checkpoint's layer files: exactly the student's 5 pipeline layers (2 transformer layers), nothing else
    files = per_rank[0]["pp2"]["layer_files"]
    assert sorted(files) == [f"layer_{i:02d}-model_00-model_states.pt" for i in range(5)], sorted(files)
    saved = {k for per_layer in files.values() for k in per_layer}
    assert sum(n for per_layer in files.values() for n in per_layer.values()) == \
        sum(v.numel() for v in case["student"].values()), f"saved parameters are not the student's: {saved}"


def _tp2xpp2_ranks(rank, world_size, case):
    return _pipeline_ranks(rank, world_size, case, {"tp2xpp2": ("tp2", 2, 2, None),
                                                     "tp2xpp2-sp": ("pp2", 2, 2, None)})


@pytest.mark.slow
@pytest.mark.numerics
def test_tp2_pp2_student_matches_pp1(setup):
    """TP=2 x PP=2 on 4 ranks, teacher trained at TP=2: each rank reads only the teacher TP rank of its shard, and
    the run trains as the PP=1 pair (the student's activation crosses TP-partitioned, the teacher's whole); and with
    sequence parallelism (no partitioning; both activations [s/TP, b, h]), teacher trained at PP=2."""
    case, refs = setup
    per_rank = run_ranks(_tp2xpp2_ranks, 4, case, timeout_s=300)
    full = sum(v.numel() for v in case["teacher"].values())
    res = [r["tp2xpp2"] for r in per_rank]
    _check_parity("TP=2xPP=2", res, refs["tp2"], full)
    assert [r["teacher_sources"] for r in res] == [[0], [1], [0], [1]]  # megatron order: TP fastest
    _check_parity("TP=2xPP=2+SP", [r["tp2xpp2-sp"] for r in per_rank], refs["pp2"], full)


@pytest.mark.slow
def test_distill_tool_with_pp2_student(setup, tmp_path):
    """``tools/distill.py --nproc 2 -- parallel.pipeline_parallel=2`` end to end (launcher, trainer, logging,
    validation, checkpoint): teacher trained at PP=2, run in bf16 (its activation crosses as a uint8 view), student
    (fp32) started from every 2nd teacher layer; the step lines carry both loss parts and the validation loss, and a
    PP=2 student checkpoint is saved."""
    case, _ = setup
    raw = {**case["raw"], "train": {**case["raw"]["train"], "steps": 2, "log_interval": 1, "eval_interval": 2,
                                    "eval_steps": 1},
           "checkpoint": {**case["raw"]["checkpoint"], "dir": str(tmp_path / "ckpt")}}
    config = tmp_path / "student.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = run_distill_tool(config, f"{case['root']}/pp2", "--student-init", "every_kth_layer", "--k", "2",
                           "--teacher-precision", "bf16",
                           overrides=("parallel.pipeline_parallel=2", "parallel.zero_stage=1"))
    assert " kl " in out and " lm_loss " in out and "valid loss" in out, out[-3000:]
    saved = next((tmp_path / "ckpt").glob("step_*"))
    assert yaml.safe_load((saved / "config.yaml").read_text())["parallel"]["pipeline_parallel"] == 2
    assert (saved / "layer_04-model_00-model_states.pt").is_file()


def test_config_refuses_bert_projection_virtual_pipeline_and_indivisible_teacher(tmp_path, tokenizer_path, shard_dir):
    """BERT students at PP=2 (with layer alignment, but not through a learned projection: refused, naming the field;
    layer pairs on different stages: tests/test_distill_bert_pipeline.py); no virtual pipeline with distillation; a
    teacher whose layers do not split over the run's PP is refused by the teacher check (preflight, before any
    process group)."""
    from largelm.train.teacher import check_teacher

    raw = _raw(tmp_path, tokenizer_path, shard_dir, num_layers=2)
    raw["distill"] = {"teacher": str(tmp_path / "t")}
    pp2 = {"pipeline_parallel": 2, "zero_stage": 1}
    student = config_from_dict({**raw, "parallel": pp2})  # GPT at PP=2: accepted
    bert = {**raw, "model": {**raw["model"], "arch": "bert"}, "parallel": pp2}
    config_from_dict(bert)  # BERT at PP=2: logit distillation accepted (tests/test_distill_bert_pipeline.py)
    config_from_dict({**bert, "distill": {**bert["distill"], "attention_weight": 1.0}})  # alignment accepted
    with pytest.raises(ConfigError, match=r"distill\.hidden_projection: the learned projection is not supported at "
                                          r"parallel\.pipeline_parallel=2"):
        config_from_dict({**bert, "distill": {**bert["distill"], "hidden_weight": 1.0, "hidden_projection": True}})
    with pytest.raises(ConfigError, match=r"parallel\.virtual_pipeline=2 is not supported with distillation"):
        config_from_dict({**raw, "model": {**raw["model"], "num_layers": 4},
                          "parallel": {**pp2, "virtual_pipeline": 2}})
    teacher = config_from_dict({**raw, "model": {**raw["model"], "num_layers": 3}, "distill": None})
    with pytest.raises(ConfigError, match=r"distill\.teacher: .* has model\.num_layers=3, which is not divisible "
                                          r"by the run's parallel\.pipeline_parallel=2"):
        check_teacher(student, teacher, tmp_path / "t")
    check_teacher(config_from_dict(raw), teacher, tmp_path / "t")  # PP=1: any layer count


def test_teacher_activation_wire_view_is_bit_exact():
    """The teacher's activation crosses stages as an integer view of the same bits (fp32 -> int32, bf16 -> uint8:
    NCCL has no int16): not floating point (DeepSpeed passes it without a gradient), and viewed back it is
    bit-identical; a view that arrives as the wrong type is refused."""
    from largelm.model.pipeline_distill import from_wire, to_wire

    g = torch.Generator().manual_seed(0)
    for dtype, wire, width in ((torch.float32, torch.int32, 16), (torch.bfloat16, torch.uint8, 32)):
        hidden = (torch.randn(8, 2, 16, generator=g) * 100).to(dtype)
        hidden[0, 0, :3] = torch.tensor([float("inf"), -0.0, float("nan")], dtype=dtype)
        bits = to_wire(hidden)
        assert bits.dtype == wire and not bits.is_floating_point() and bits.shape == (8, 2, width)
        back = from_wire(bits.clone(), dtype)
        assert back.shape == hidden.shape and torch.equal(back.view(wire), hidden.view(wire))  # every bit
    with pytest.raises(TypeError, match="expected the torch.bfloat16 view torch.uint8"):
        from_wire(to_wire(torch.zeros(2)), torch.bfloat16)

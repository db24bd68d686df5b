"""Distillation with sharded teacher and student (largelm/train/distill.py, largelm/parallel/vocab_parallel_kl.py).

* ``vocab_parallel_kl`` at TP=2 against a float64 reference of the plain full-vocabulary KL, forward and gradient,
  with padded entries (one case where a whole partition is padding).
* The recipe that cuts one TP rank's shard for any TP from a checkpoint's shards at any other TP
  (largelm/checkpoint/tp_slice.py) equals cutting the full tensor (fast).
* A TP=2 teacher + TP=2 student equals the TP=1 pair (same weights, same batch) in every loss part and every
  student gradient; teachers trained at TP=2 and at PP=2 are read directly into TP=2 and TP=1 students, each rank
  reading only the teacher TP ranks that hold its shard.
* ``tools/distill.py --nproc 2 -- parallel.tensor_parallel=2`` end to end with the TP=2 teacher checkpoint.
* (fast) a teacher that cannot be split over the run's TP is refused before any process group.

Tolerances (tests/tolerances.py): the TP=2 results must be as accurate as the TP=1 fp32 ones against a float64
evaluation of the same pair (``f64_bound`` for gradients; for the loss parts, first-order bounds from the logit
errors, ``_loss_bounds``): tensor parallelism only changes summation order.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from distill_utils import VOCAB, random_gpt_state, run_distill_tool, write_teachers
from mp_utils import run_ranks, single_rank_parallel_state
from tolerances import K_F64, U32, f64_bound, max_err
from train_utils import tiny_config

from largelm.config import config_from_dict

TEMPERATURE, ALPHA = 2.0, 0.6
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}  # the teachers' training layouts (tensor, pipeline parallel)


# --- the vocabulary-parallel KL --------------------------------------------------------------------------------
def _kl_full(student: torch.Tensor, teacher: torch.Tensor, vocab: int) -> torch.Tensor:
    """The plain full-vocabulary KL per token (the TP=1 formula this project used before): trusted in fp32,
    exact in float64."""
    log_p_t = F.log_softmax(teacher[..., :vocab], -1)
    return (log_p_t.exp() * (log_p_t - F.log_softmax(student[..., :vocab], -1))).sum(-1)


def _kl_rank(rank, world_size, cases):
    from largelm.parallel import groups
    from largelm.parallel.vocab_parallel_kl import vocab_parallel_kl

    groups.init_distributed()
    groups.init_model_parallel(tensor_parallel=2, pipeline_parallel=1)
    try:
        out = []
        for case in cases:
            student = case["student"].chunk(2, -1)[rank].clone().requires_grad_()
            kl = vocab_parallel_kl(student, case["teacher"].chunk(2, -1)[rank], case["vocab"])
            (kl * case["weights"]).sum().backward()
            out.append(dict(kl_err=max_err(kl, case["kl64"]),
                            grad_err=max_err(student.grad, case["grad64"].chunk(2, -1)[rank]),
                            padded_grad=student.grad[..., max(0, case["vocab"] - rank * 32):].abs().sum().item()))
        return out
    finally:
        groups.destroy()


@pytest.mark.slow
@pytest.mark.numerics
def test_vocab_parallel_kl_matches_float64():
    """Per-token KL and its gradient at TP=2 are as accurate as the full-vocabulary fp32 KL against float64;
    padded entries (given huge logits here) have no effect and get zero gradient. Vocabulary 50 of 64 (rank 1's
    partition half padding) and 20 of 64 (rank 1's partition all padding)."""
    g = torch.Generator().manual_seed(0)
    cases, bounds = [], []
    for vocab in (50, 20):
        student, teacher = torch.randn(3, 5, 64, generator=g) * 3, torch.randn(3, 5, 64, generator=g) * 3
        student[..., vocab:] += 100.0
        teacher[..., vocab:] -= 100.0
        weights = torch.rand(3, 5, generator=g)
        trusted_s = student.clone().requires_grad_()
        trusted = _kl_full(trusted_s, teacher, vocab)
        (trusted * weights).sum().backward()
        exact_s = student.double().requires_grad_()
        exact = _kl_full(exact_s, teacher.double(), vocab)
        (exact * weights.double()).sum().backward()
        cases.append(dict(student=student, teacher=teacher, weights=weights, vocab=vocab, kl64=exact.detach(),
                          grad64=exact_s.grad))
        bounds.append((f64_bound(trusted, exact), f64_bound(trusted_s.grad[..., :vocab], exact_s.grad[..., :vocab])))
    for rank, res in enumerate(run_ranks(_kl_rank, 2, cases, timeout_s=300)):
        for case, r, (kl_tol, grad_tol) in zip(cases, res, bounds):
            what = f"rank {rank}, vocabulary {case['vocab']}"
            assert r["kl_err"] <= kl_tol, f"{what}: KL off by {r['kl_err']} (bound {kl_tol})"
            assert r["grad_err"] <= grad_tol, f"{what}: gradient off by {r['grad_err']} (bound {grad_tol})"
            assert r["padded_grad"] == 0.0, f"{what}: padded entries got a gradient"


# --- teachers trained at TP=2 and PP=2, students at TP=2 and TP=1 ------------------------------------------------
def _raw(tmp, tokenizer_path, shard_dir, seq, **model) -> dict:
    path = tiny_config(tmp, tokenizer_path, shard_dir, seq, model={"tie_embeddings": False, **model},
                       parallel={"zero_stage": 1}, train={"grad_accum_steps": 2, "micro_batch_size": 2})
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tokenizer_path, shard_dir, shard_seq_length):
    """``(root, teacher weights, student raw config)``: a 4-layer teacher saved as trained at TP=2 and at PP=2
    (``root/tp2``, ``root/pp2``), and a 2-layer student config."""
    tmp = tmp_path_factory.mktemp("sharded_teachers")
    (tmp / "t").mkdir()
    teacher_raw = _raw(tmp / "t", tokenizer_path, shard_dir, shard_seq_length, num_layers=4, vocab_size=VOCAB)
    state = random_gpt_state(config_from_dict(teacher_raw).model, seed=1)
    run_ranks(write_teachers, 2, teacher_raw, str(tmp / "teachers"), state, LAYOUTS, timeout_s=300)
    return tmp / "teachers", state, _raw(tmp, tokenizer_path, shard_dir, shard_seq_length, num_layers=2,
                                         vocab_size=VOCAB)


def _student_cfg(raw: dict, teacher, tp: int, sequence_parallel: bool = False):
    return config_from_dict({**raw, "parallel": {"tensor_parallel": tp, "zero_stage": 1,
                                                 "sequence_parallel": sequence_parallel},
                             "distill": {"teacher": str(teacher), "alpha": ALPHA, "temperature": TEMPERATURE,
                                         "teacher_precision": "fp32"}})


def _student(cfg, weights):
    from largelm.model.registry import get_arch
    from largelm.model.weights import load_full_state_dict

    arch = get_arch("gpt")
    model = arch.build_model(cfg.model, cfg.parallel, dtype=torch.float32)
    load_full_state_dict(model, weights)
    return model


def _tp2_students(rank, world_size, case):
    from largelm.parallel import groups
    from largelm.parallel.cpu_compat import model_parallel_manual_seed
    from largelm.parallel.sharding import shard_state_dict, shard_tensor
    from largelm.train.distill import DistillLoss

    groups.init_distributed()
    groups.init_model_parallel(tensor_parallel=2, pipeline_parallel=1)
    model_parallel_manual_seed(1)  # megatron's model-parallel RNG (the trainer seeds it; sequence parallelism forks it)
    try:
        out = {}
        for layout in LAYOUTS:
            # with the PP=2-trained teacher: sequence parallelism (student and teacher, same TP group)
            cfg = _student_cfg(case["raw"], f"{case['root']}/{layout}", tp=2, sequence_parallel=layout == "pp2")
            loss = DistillLoss(cfg, init_student=False)
            student = _student(cfg, case["student"])
            metrics = loss(student, {"tokens": case["tokens"]})
            metrics["loss"].backward()
            exact = shard_state_dict(case["grads64"], student, rank, 2)
            with torch.no_grad():
                vocab_columns = student(*_inputs(case["tokens"])).size(-1)
            out[layout] = dict(sources=loss.teacher_sources, metrics={k: v.item() for k, v in metrics.items()},
                               grad_err={n: max_err(p.grad, exact[n]) for n, p in student.named_parameters()},
                               teacher_numel=sum(p.numel() for p in loss.teacher.parameters()),
                               vocab_columns=vocab_columns)
        # student_init every_kth_layer: this rank's student shard is the teacher's shard of layers 0 and 2
        cfg = _student_cfg(case["raw"], f"{case['root']}/pp2", tp=2)
        cfg = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"student_init": "every_kth_layer"})})
        init = DistillLoss(cfg).student_init
        for name in ("decoder.layers.1.mlp.linear_fc1.weight", "decoder.layers.1.self_attention.linear_proj.weight",
                     "output_layer.weight"):
            teacher_name = name.replace("layers.1.", "layers.2.")
            dim = 1 if "linear_proj" in name else 0
            out.setdefault("init_err", {})[name] = max_err(init[name], shard_tensor(case["teacher"][teacher_name],
                                                                                   rank, 2, dim))
        return out
    finally:
        groups.destroy()


def _inputs(tokens):
    from largelm.model.gpt import split_tokens

    input_ids, _, position_ids = split_tokens(tokens)
    return input_ids, position_ids, None


def _reference(loss, student, tokens) -> tuple[dict, dict, dict]:
    """The TP=1 pair in fp32 (``DistillLoss``: trusted), then the same modules in float64 with the plain
    formulas: ``(fp32 metrics, float64 metrics, bounds)``; the bounds hold the float64 student gradients
    ("grads64") and the allowed gradient errors ("grad_tol")."""
    from largelm.model.gpt import split_tokens

    metrics = loss(student, {"tokens": tokens})
    metrics["loss"].backward()
    grads32 = {n: p.grad.detach().clone() for n, p in student.named_parameters()}
    input_ids, labels, position_ids = split_tokens(tokens)
    with torch.no_grad():
        t32, s32 = loss.teacher(input_ids, position_ids, None), student(input_ids, position_ids, None)
    # the same modules in float64 (megatron's modules hold process groups: no deepcopy)
    teacher64, student64 = loss.teacher.double(), student.zero_grad(set_to_none=True) or student.double()
    t64 = teacher64(input_ids, position_ids, None)
    s64 = student64(input_ids, position_ids, None)
    assert t64.dtype == s64.dtype == torch.float64
    lm = F.cross_entropy(s64.reshape(-1, s64.size(-1)), labels.reshape(-1))  # padded entries count, as megatron's
    kl_tok = _kl_full(s64 / TEMPERATURE, t64.detach() / TEMPERATURE, VOCAB)
    kl = kl_tok.mean() * TEMPERATURE**2
    total = ALPHA * kl + (1 - ALPHA) * lm
    total.backward()
    exact = {"loss": total, "kl": kl, "lm_loss": lm}
    log_ratio = (F.log_softmax(t64[..., :VOCAB] / TEMPERATURE, -1) - F.log_softmax(s64[..., :VOCAB] / TEMPERATURE, -1))
    spread = (log_ratio - kl_tok.unsqueeze(-1)).abs().max().item()
    bounds = _loss_bounds(metrics, exact, max_err(s32, s64), max_err(t32, t64), spread)
    bounds["grads64"] = {n: p.grad.detach().clone() for n, p in student64.named_parameters()}
    bounds["grad_tol"] = {n: f64_bound(g, bounds["grads64"][n]) for n, g in grads32.items()}
    return {k: v.item() for k, v in metrics.items()}, {k: v.item() for k, v in exact.items()}, bounds


def _loss_bounds(trusted: dict, exact: dict, s_err: float, t_err: float, spread: float) -> dict:
    """Allowed |value - float64| of each loss part for an fp32 evaluation as accurate as the trusted one:
    K_F64 x (trusted error + first-order effect of the trusted logit errors + one rounding). To first order a
    cross entropy moves by <= 2 x the largest student-logit error (its gradient, softmax - one-hot, has L1 norm
    <= 2); T^2 x KL(t/T || s/T) by <= T x (2 x the student-logit error + ``spread`` x the teacher-logit error),
    ``spread`` = max |log p_t - log p_s - KL| (the KL's gradient in the teacher logits is p_t times that)."""
    def bound(name: str, logit_effect: float) -> float:
        return K_F64 * (abs(trusted[name].item() - exact[name].item()) + logit_effect + U32 * abs(exact[name].item()))

    lm = bound("lm_loss", 2 * s_err)
    kl = bound("kl", TEMPERATURE * (2 * s_err + spread * t_err))
    return {"lm_loss": lm, "kl": kl, "loss": ALPHA * kl + (1 - ALPHA) * lm + K_F64 * U32 * abs(exact["loss"].item())}


@pytest.mark.slow
@pytest.mark.numerics
def test_tp2_pair_equals_tp1_pair_for_teachers_trained_at_tp2_and_pp2(teachers):
    """For each teacher checkpoint (trained at TP=2, at PP=2 with TP=1): the TP=1 pair (teacher joined from both TP
    ranks) and the TP=2 pair (each rank reads only the teacher's TP rank it needs) give the same KL, LM loss,
    total and student gradients within the float64-derived bounds; each TP=2 rank holds half the teacher's
    tensor-parallel weights, and the logits it sees are its half of the vocabulary. The TP=2 pair with the PP=2
    teacher runs with sequence parallelism. ``student_init:
    every_kth_layer`` at TP=2 gives each rank the teacher's shard of the copied layers."""
    from largelm.train.distill import DistillLoss

    root, teacher_weights, raw = teachers
    student_weights = random_gpt_state(config_from_dict(raw).model, seed=2)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, raw["model"]["seq_length"] + 1), generator=g)
    refs = {}
    with single_rank_parallel_state():
        for layout in LAYOUTS:
            cfg = _student_cfg(raw, root / layout, tp=1)
            loss = DistillLoss(cfg, init_student=False)
            assert loss.teacher_sources == ([0, 1] if layout == "tp2" else [0])  # TP=1: both halves of a TP=2 one
            full_numel = sum(p.numel() for p in loss.teacher.parameters())
            refs[layout] = (*_reference(loss, _student(cfg, student_weights), tokens), full_numel)
    grads64 = refs["tp2"][2]["grads64"]
    assert all(max_err(grads64[n], refs["pp2"][2]["grads64"][n]) < 1e-9 for n in grads64)  # same teacher weights
    case = dict(raw=raw, root=str(root), student=student_weights, tokens=tokens, grads64=grads64,
                teacher=teacher_weights)
    for rank, per_layout in enumerate(run_ranks(_tp2_students, 2, case, timeout_s=300)):
        init_err = per_layout.pop("init_err")
        assert all(e == 0.0 for e in init_err.values()), f"rank {rank}: every_kth_layer student shard: {init_err}"
        for layout, res in per_layout.items():
            trusted, exact, bounds, full_numel = refs[layout]
            what = f"teacher trained at {layout}, TP=2 student rank {rank}"
            assert res["sources"] == ([rank] if layout == "tp2" else [0]), f"{what}: read {res['sources']}"
            for name, value in res["metrics"].items():
                assert abs(value - exact[name]) <= bounds[name], \
                    f"{what}: {name} {value} vs float64 {exact[name]} (TP=1 fp32 {trusted[name]}, bound {bounds[name]})"
            for name, err in res["grad_err"].items():
                assert err <= bounds["grad_tol"][name], f"{what}: gradient of {name} off by {err}"
            assert res["teacher_numel"] < 0.75 * full_numel, f"{what}: the rank holds more than its teacher shard"
            assert res["vocab_columns"] == 512, f"{what}: logits not split over the vocabulary"
    assert refs["tp2"][0]["kl"] > 0.05  # the student differs from the teacher: the KL and its gradient matter


@pytest.mark.slow
def test_distill_tool_with_tp2_teacher_and_tp2_student(teachers, tmp_path, tokenizer_path, shard_dir,
                                                       shard_seq_length):
    """``tools/distill.py`` end to end: teacher trained at TP=2, student at TP=2 on 2 ranks, started from every
    2nd teacher layer; the run trains, logs both loss parts and saves a TP=2 student checkpoint."""
    root, _, _ = teachers
    student = tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length,
                          model={"tie_embeddings": False, "num_layers": 2},
                          train={"steps": 2, "log_interval": 1, "grad_accum_steps": 1})
    out = run_distill_tool(student, root / "tp2", "--student-init", "every_kth_layer", "--k", "2",
                           overrides=("parallel.tensor_parallel=2", "parallel.zero_stage=1"))
    assert " kl " in out and " lm_loss " in out, out[-3000:]
    saved = next((tmp_path / "ckpt").glob("step_*"))
    assert yaml.safe_load((saved / "config.yaml").read_text())["parallel"]["tensor_parallel"] == 2
    assert (saved / "mp_rank_01_model_states.pt").is_file()


def test_teacher_that_cannot_split_over_the_run_tp_is_refused(tmp_path, tokenizer_path, shard_dir, shard_seq_length):
    from largelm.config import ConfigError
    from largelm.train.teacher import check_teacher

    raw = _raw(tmp_path, tokenizer_path, shard_dir, shard_seq_length, vocab_size=VOCAB)
    student = _student_cfg(raw, tmp_path / "teacher", tp=2)
    teacher = config_from_dict({**raw, "model": {**raw["model"], "num_attention_heads": 1}})
    check_teacher(student, config_from_dict(raw), tmp_path / "teacher")  # 4 heads split over TP=2
    with pytest.raises(ConfigError, match=r"teacher is built with the run's parallel.tensor_parallel=2, but .*"
                                          r"num_attention_heads=1 is not divisible"):
        check_teacher(student, teacher, tmp_path / "teacher")


@pytest.mark.parametrize("stride,dim", [(1, 0), (2, 0), (1, 1)], ids=["column", "swiglu-fc1", "row"])
def test_tp_slice_recipe_equals_cutting_the_full_tensor(stride, dim):
    """Every (source TP, target TP) in {1, 2, 4}^2: the target shard assembled from the source shards is the target
    cut of the full tensor (megatron's layout: ``shard_tensor``), for column/row-parallel and strided tensors; and
    for vocabulary tensors padded differently at each TP, with zero padding rows in the target."""
    from largelm.checkpoint.tp_slice import _assemble, slice_pieces
    from largelm.parallel.sharding import shard_tensor

    g = torch.Generator().manual_seed(0)
    full = torch.randn(16, 16, generator=g)
    vocab = 10
    for source_tp in (1, 2, 4):
        shards = {j: {"w": shard_tensor(full, j, source_tp, dim, stride)} for j in range(source_tp)}
        source_padded = 8 * source_tp * (-(-vocab // (8 * source_tp)))  # make_vocab_size_divisible_by 8
        vocab_full = torch.cat([full[:vocab], torch.full((source_padded - vocab, 16), 99.0)])  # trained-down padding
        vocab_shards = {j: {"w": shard_tensor(vocab_full, j, source_tp, 0)} for j in range(source_tp)}
        for tp in (1, 2, 4):
            for rank in range(tp):
                pieces = slice_pieces(16, (dim, stride), source_tp, tp, rank)
                torch.testing.assert_close(_assemble(pieces, shards, "w", dim),
                                           shard_tensor(full, rank, tp, dim, stride), rtol=0, atol=0)
                if stride == 1 and dim == 0:
                    padded = 8 * tp * (-(-vocab // (8 * tp)))
                    expected = torch.cat([full[:vocab], torch.zeros(padded - vocab, 16)])
                    pieces = slice_pieces(padded, (0, 1), source_tp, tp, rank, vocab, source_padded)
                    torch.testing.assert_close(_assemble(pieces, vocab_shards, "w", 0),
                                               shard_tensor(expected, rank, tp, 0), rtol=0, atol=0)
                    assert {p[0] for p in pieces if p[0] != "zeros"} <= set(range(source_tp))

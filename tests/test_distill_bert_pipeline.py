"""BERT distillation with a pipeline-parallel student (largelm/train/distill_pipeline.py ``BertPipelineDistillLoss``,
largelm/model/pipeline_distill.py ``DistillBertPipelineModule``).

One 4-layer BERT teacher (random weights) saved by a real engine at TP=1, PP=1; a 2-layer student from fixed random
weights trained 3 optimizer steps (2 micro-batches each, grad clipping 1.0 so the gradient norm feeds the update) on
the same explicit masked batches (padding, SOP), KL on the masked positions + (1 - alpha) x (MLM + SOP):

* PP=2 student + PP=2 teacher, KL + MLM + SOP (each stage runs its half of the teacher; the teacher's hidden state
  crosses the stages as an integer view beside the student's hidden state and the padding mask) on 2 ranks vs the
  PP=1 pair (``DenseStep`` + ``BertDistillLoss``) from the same weights: per step the total loss, ``distill/kl``,
  ``distill/mlm_loss``, ``distill/sop_loss`` and the global gradient norm; the same metric names; validation is
  the plain BERT loss with BERT's ``valid/`` metrics, as at PP=1.
* The PP=2 student's checkpoint layer files hold exactly the student's parameters (no teacher tensor).
* ``student_init: every_kth_layer`` at PP=2: each stage's student layers are the teacher's layers i*k, the last
  stage's heads the teacher's.
* With hidden-state (cosine + MSE) and attention-map alignment on (every_kth_layer: one aligned pair on each stage,
  the first stage's part entering the backward through its output): the same per-step values plus
  ``distill/hidden`` and ``distill/attention`` (summed over the stages) equal the PP=1 pair's; dropping the first
  stage's backward attachment fails the test.
* TP=2 x PP=2 (and with sequence parallelism) on 4 ranks, alignment on: the same values as the PP=1 pair.
* (fast) an explicit layer pair across stages and ``hidden_projection`` at PP>1 are refused, naming the field.

Tolerance (tests/tolerances.py, as tests/test_distill_bert_tp.py): the layouts differ in summation order only (the
pipeline's micro-batch and stage sums), so each value is within ``sum_rtol`` of one step's reduction chain (teacher
and student layers, BERT's LM head, the 1024-way softmax, the step's tokens, forward and backward). Measured worst:
1.0e-6 (gradient norm, TP=2xPP=2+SP; of 3.7e-5); rolling the teacher's hidden state by one position on receipt
fails the test.
"""

from __future__ import annotations

import pytest
import torch
from mp_utils import rel_diff, run_ranks, single_rank_parallel_state
from test_distill_bert_tp import (
    ACCUM,
    RTOL,
    STEPS,
    TEACHER_LAYERS,
    masked_batches,
    random_bert,
    raw_config,
    save_teacher,
)

from largelm.config import ConfigError, config_from_dict

PARTS = ("kl", "mlm_loss", "sop_loss")
METRICS = ("losses", "norms", *PARTS)
ALIGN_METRICS = (*METRICS, "hidden", "attention")
NO_ALIGNMENT = {"hidden_weight": 0.0, "attention_weight": 0.0, "hidden_loss": "cosine"}
# hidden states (cosine + MSE) and attention maps of every_kth_layer: student layer i <-> teacher layer 2i + 1, one
# pair per stage at PP=2 (the first stage's part enters the backward through its output)
ALIGNMENT = {"hidden_weight": 1.0, "attention_weight": 1.0, "hidden_loss": "cosine+mse"}


def _cfg(case, pp: int, tp: int = 1, sp: bool = False, **distill):
    raw = raw_config(case["tokenizer"], case["teacher"], "ref", **{**NO_ALIGNMENT, **distill})
    raw["parallel"] = {**raw["parallel"], "tensor_parallel": tp, "sequence_parallel": sp, "pipeline_parallel": pp,
                       "zero_stage": 1}
    return config_from_dict(raw)


def _train(cfg, case, ckpt: str | None = None) -> dict:
    parts = PARTS + (("hidden", "attention") if cfg.distill.aligns_layers else ())
    from largelm.parallel.cpu_compat import model_parallel_manual_seed
    from largelm.train.step import build_step

    torch.manual_seed(cfg.train.seed)
    model_parallel_manual_seed(cfg.train.seed)
    step = build_step(cfg, torch.distributed.get_world_size(), init_state_dict=case["student"])
    out: dict = {k: [] for k in ("losses", "norms", *parts)}
    batches = case["batches"]
    for s in range(STEPS):
        out["losses"].append(step.train_step(iter(batches[s * ACCUM:(s + 1) * ACCUM])).item())
        out["norms"].append(float(step.engine.get_global_grad_norm()))
        for part in parts:
            out[part].append(step.last_metrics[f"distill/{part}"])
    out["metric_names"] = sorted(step.last_metrics)
    out["valid"] = step.eval_loss(batches[-1]).item()
    out["valid_metrics"] = dict(step.last_eval_metrics)
    if ckpt is not None:
        out["layer_files"] = _saved_layer_files(cfg, step, ckpt)
    return out


def _saved_layer_files(cfg, step, root: str) -> dict:
    """{layer file: {parameter: numel}} of a checkpoint of the run."""
    import torch.distributed as dist

    from largelm.checkpoint.manager import CheckpointManager
    from largelm.config import dump_config

    meta = {"world_size": dist.get_world_size(), "tensor_parallel": 1, "pipeline_parallel": 2, "zero_stage": 1}
    saved = CheckpointManager(root, config_yaml=dump_config(cfg), meta=meta).save(step.engine, STEPS, {"step": STEPS})
    dist.barrier()
    files = {}
    for path in sorted(saved.glob("layer_*-model_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        files[path.name] = {k: int(v.numel()) for k, v in state.items() if not k.endswith("_extra_state")}
    return files


def _pp2_rank(rank, world_size, case):
    from megatron.core import parallel_state

    from largelm.parallel import groups
    from largelm.train.distill_pipeline import build_distill_pipeline

    groups.init_distributed()
    try:
        groups.init_model_parallel(1, 2)
        out = _train(_cfg(case, 2), case, ckpt=case["ckpt"])
        out["aligned"] = _train(_cfg(case, 2, **ALIGNMENT), case)
        module = build_distill_pipeline(_cfg(case, 2, student_init="every_kth_layer", k=2))
        teacher, errs = case["teacher_state"], {}
        for index in range(module._local_start, module._local_stop):
            layer = module.stage_layer(index)
            if 1 <= index <= 2:  # student layer index - 1 <- teacher layer 2 x (index - 1)
                key = f"encoder.layers.{2 * (index - 1)}.mlp.linear_fc1.weight"
                errs[key] = (layer.layer.mlp.linear_fc1.weight - teacher[key]).abs().max()
            elif index == module.num_transformer_layers + 2:  # the heads
                for key in ("lm_head.dense.weight", "pooler.dense.weight", "binary_head.weight"):
                    errs[key] = (layer.state_dict()[key] - teacher[key]).abs().max()
        out["init_errs"] = {k: float(v) for k, v in errs.items()}
        out["stage"] = module.stage_id
        parallel_state.destroy_model_parallel()
        return out
    finally:
        groups.destroy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path):
    """The saved teacher, the student's starting weights, the batches, and the PP=1 runs without and with
    alignment."""
    tmp = tmp_path_factory.mktemp("distill_bert_pipeline")
    teacher = str(tmp / "teacher")
    case = dict(tokenizer=str(tokenizer_path), teacher=teacher, batches=masked_batches(STEPS + 1))
    with single_rank_parallel_state(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it (normally set by the launcher)
        teacher_cfg = config_from_dict({k: v for k, v in raw_config(tokenizer_path, teacher, "ref",
                                                                    TEACHER_LAYERS).items() if k != "distill"})
        case["teacher_state"] = random_bert(teacher_cfg, seed=1)
        save_teacher(teacher_cfg, teacher, case["teacher_state"])
        case["student"] = random_bert(_cfg(case, 1), seed=2)
        ref = _train(_cfg(case, 1), case)
        ref_aligned = _train(_cfg(case, 1, **ALIGNMENT), case)
    return case, ref, ref_aligned


def _check_aligned(name, aligned, ref_aligned):
    print(f"{name} with alignment: worst rel diff vs PP=1 " + " ".join(
        f"{k} {max(rel_diff(r[k][s], ref_aligned[k][s]) for r in aligned for s in range(STEPS)):.1e}"
        for k in ALIGN_METRICS))
    for rank, res in enumerate(aligned):
        for key in ALIGN_METRICS:
            for s in range(STEPS):
                assert rel_diff(res[key][s], ref_aligned[key][s]) < RTOL, \
                    f"{name} aligned rank {rank} step {s + 1}: {key} {res[key][s]} vs PP=1 {ref_aligned[key][s]}"
        assert res["metric_names"] == ref_aligned["metric_names"]
        assert rel_diff(res["valid"], ref_aligned["valid"]) < RTOL
    assert ref_aligned["hidden"][0] > 0.05 and ref_aligned["attention"][0] > 1e-3, ref_aligned


@pytest.mark.slow
@pytest.mark.numerics
def test_pp2_bert_pair_equals_pp1_pair(setup, tmp_path):
    case, ref, ref_aligned = setup
    case = {**case, "ckpt": str(tmp_path / "ckpt")}
    per_rank = run_ranks(_pp2_rank, 2, case, timeout_s=300)
    print("\nPP=2: worst rel diff vs PP=1 " + " ".join(
        f"{k} {max(rel_diff(r[k][s], ref[k][s]) for r in per_rank for s in range(STEPS)):.1e}" for k in METRICS))
    for rank, res in enumerate(per_rank):
        for key in METRICS:
            for s in range(STEPS):
                assert rel_diff(res[key][s], ref[key][s]) < RTOL, \
                    f"rank {rank} step {s + 1}: {key} {res[key][s]} vs PP=1 {ref[key][s]} (rtol {RTOL:.1e})"
        assert res["metric_names"] == ref["metric_names"] == [
            "distill/kl", "distill/mlm_acc", "distill/mlm_loss", "distill/sop_acc", "distill/sop_loss"]
        assert rel_diff(res["valid"], ref["valid"]) < RTOL, f"rank {rank}: validation loss"
        assert sorted(res["valid_metrics"]) == sorted(ref["valid_metrics"]) == [
            "valid/mlm_acc", "valid/mlm_loss", "valid/sop_acc", "valid/sop_loss"]
        for name, value in ref["valid_metrics"].items():
            assert rel_diff(res["valid_metrics"][name], value) < RTOL, f"rank {rank}: {name}"
        assert all(e == 0.0 for e in res["init_errs"].values()), f"rank {rank}: every_kth_layer {res['init_errs']}"
    _check_aligned("PP=2", [r["aligned"] for r in per_rank], ref_aligned)
    assert sorted(r["stage"] for r in per_rank) == [0, 1]
    assert len(per_rank[0]["init_errs"]) + len(per_rank[1]["init_errs"]) == 5  # 2 layers + 3 heads checked
    assert ref["kl"][0] > 0.05 and ref["norms"][0] > 1.0, ref  # a real KL; clipping was active
    # the checkpoint's layer files: the student's pipeline layers (embedding, 2 transformer layers, final norm, heads,
    # output bias; layer 05, the last stage's tied copy of the word embedding, is saved once, with layer 00), and
    # exactly the student's parameters: no teacher tensor
    files = per_rank[0]["layer_files"]
    assert sorted(files) == [f"layer_{i:02d}-model_00-model_states.pt" for i in (0, 1, 2, 3, 4, 6)], sorted(files)
    saved = sum(n for per_layer in files.values() for n in per_layer.values())
    assert saved == sum(v.numel() for v in case["student"].values()), files


def _tp2xpp2_rank(rank, world_size, case):
    from megatron.core import parallel_state

    from largelm.parallel import groups

    groups.init_distributed()
    try:
        out = {}
        for sp in (False, True):
            groups.init_model_parallel(2, 2)
            out[sp] = _train(_cfg(case, 2, tp=2, sp=sp, **ALIGNMENT), case)
            parallel_state.destroy_model_parallel()
        return out
    finally:
        groups.destroy()


@pytest.mark.slow
@pytest.mark.numerics
def test_tp2_pp2_bert_pair_with_alignment_equals_pp1_pair(setup):
    """TP=2 x PP=2 on 4 ranks, alignment on: the student's activation crosses TP-partitioned, the padding mask and
    the teacher's view whole; attention maps hold each rank's heads (TP-reduced sums); and with sequence parallelism
    (no partitioning; hidden states [s/TP, b, h], their alignment sums TP-reduced)."""
    case, _, ref_aligned = setup
    per_rank = run_ranks(_tp2xpp2_rank, 4, case, timeout_s=300)
    _check_aligned("TP=2xPP=2", [r[False] for r in per_rank], ref_aligned)
    _check_aligned("TP=2xPP=2+SP", [r[True] for r in per_rank], ref_aligned)


def test_config_refuses_pairs_on_different_stages(tmp_path, tokenizer_path):
    """At PP=2 each aligned (student, teacher) layer pair must sit on one stage: every_kth_layer does; an explicit
    pair across stages is refused with the teacher's config, naming distill.layer_map; hidden_projection is refused."""
    from largelm.train.teacher import check_teacher

    case = dict(tokenizer=str(tokenizer_path), teacher=str(tmp_path / "t"))
    teacher = config_from_dict({k: v for k, v in raw_config(tokenizer_path, case["teacher"], "ref",
                                                            TEACHER_LAYERS).items() if k != "distill"})
    check_teacher(_cfg(case, 2, **ALIGNMENT), teacher, tmp_path / "t")  # pairs (0, 1), (1, 3): one stage each
    check_teacher(_cfg(case, 2, **ALIGNMENT, layer_map=[[0, 0], [1, 2]]), teacher, tmp_path / "t")
    with pytest.raises(ConfigError, match=r"distill\.layer_map: student layer 0 \(pipeline stage 0\) is aligned "
                                          r"with teacher layer 3 \(stage 1\) at parallel\.pipeline_parallel=2"):
        check_teacher(_cfg(case, 2, **ALIGNMENT, layer_map=[[0, 3]]), teacher, tmp_path / "t")
    check_teacher(_cfg(case, 1, **ALIGNMENT, layer_map=[[0, 3]]), teacher, tmp_path / "t")  # PP=1: any pair
    with pytest.raises(ConfigError, match=r"distill\.hidden_projection: .* not supported at "
                                          r"parallel\.pipeline_parallel=2"):
        _cfg(case, 2, **ALIGNMENT, hidden_projection=True)

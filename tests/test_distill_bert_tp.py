"""BERT distillation at tensor parallelism 2 (largelm/train/distill_bert.py): a TP=2 BERT teacher + TP=2 BERT student
train exactly like the TP=1 pair from the same starting weights.

One 4-layer BERT teacher (random weights, large enough that every tensor matters) saved by a real engine at TP=1;
2-layer students from fixed random weights, trained 3 optimizer steps (2 micro-batches each, real ``DenseStep`` +
DeepSpeed, grad clipping 1.0 so the gradient norm feeds the update) on the same explicit masked batches with the KL,
MLM + SOP, hidden-state (cosine+MSE) and attention-map alignment all on:

* ``tp2``: TP=2, ZeRO-1, the teacher's TP shards read per rank;
* ``tp2-sp-proj``: TP=2 with sequence parallelism (hidden states split over the sequence) and ZeRO-2, a student of
  hidden size 32 aligned to the teacher's 64 through ``distill.hidden_projection`` (replicated over TP; its
  gradients are TP-reduced under SP) - against the TP=1 pair with the same projection.

Compared per step on both TP ranks: total loss, ``kl``, ``mlm_loss``, ``hidden``, ``attention`` and DeepSpeed's
global gradient norm; and the projection weights stay identical on the two TP ranks. Tolerance
(tests/tolerances.py): the layouts differ in summation order only, so each value is within ``sum_rtol`` of one
step's reduction chain (teacher and student layers, the 1024-way softmax, the tokens of a step, forward and
backward) of the TP=1 value. ``student_init: every_kth_layer`` at TP=2 gives each rank the teacher's shard of
layers 0 and 2, including the BERT heads (LM head, vocab-parallel output bias, pooler, binary head).
"""

from __future__ import annotations

import pytest
import torch
from mp_utils import assert_steps_match, randomize, rel_diff, run_ranks, single_rank_parallel_state
from tolerances import chain_length, sum_rtol

VOCAB = 1000  # the test tokenizer's; padded to 1024 at TP=1 and TP=2
SEQ, MICRO, ACCUM, STEPS = 32, 4, 2, 3
TEACHER_LAYERS, STUDENT_LAYERS = 4, 2
STEP_CHAIN = chain_length(layers=TEACHER_LAYERS + STUDENT_LAYERS, hidden=64, ffn=256, seq=SEQ, heads=4, vocab=1024,
                          tokens=MICRO * ACCUM * SEQ, extra=2 * 64, backward=True)
RTOL = sum_rtol(STEP_CHAIN)
PARTS = ("kl", "mlm_loss", "sop_loss", "hidden", "attention")
# name -> (tensor parallel, sequence parallel, ZeRO stage, student hidden size, projection)
LAYOUTS = {"ref": (1, False, 1, 64, False), "ref-proj": (1, False, 1, 32, True),
           "tp2": (2, False, 1, 64, False), "tp2-sp-proj": (2, True, 2, 32, True)}


def raw_config(tokenizer_path, teacher: str, layout: str, num_layers: int = STUDENT_LAYERS, **distill) -> dict:
    tp, sp, zero, hidden, projection = LAYOUTS[layout]
    return {
        "model": {"arch": "bert", "num_layers": num_layers, "hidden_size": hidden, "num_attention_heads": 4,
                  "seq_length": SEQ, "vocab_size": VOCAB, "make_vocab_size_divisible_by": 64},
        "tokenizer": {"model": str(tokenizer_path)},
        "data": {"train": [{"path": "unused"}]},  # explicit batches
        "bert": {"objective": "sop", "residual_post_layernorm": True},
        "parallel": {"tensor_parallel": tp, "sequence_parallel": sp, "zero_stage": zero},
        "optimizer": {"lr": 3e-3, "min_lr": 0.0, "warmup_steps": 0, "decay_style": "constant",
                      "weight_decay": 0.1, "grad_clip": 1.0},
        "train": {"steps": STEPS, "micro_batch_size": MICRO, "grad_accum_steps": ACCUM, "precision": "fp32",
                  "seed": 5},
        "distill": {"teacher": teacher, "alpha": 0.5, "temperature": 2.0, "teacher_precision": "fp32",
                    "hidden_weight": 1.0, "hidden_loss": "cosine+mse", "attention_weight": 1.0,
                    "hidden_projection": projection, **distill},
    }


def masked_batches(steps: int, seed: int = 0) -> list[dict]:
    """``steps * ACCUM`` BERT micro-batches: random ids, 15% of the real tokens masked for MLM, padding at the end
    of two samples, sentence B on the second half, random SOP labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps * ACCUM):
        mask = torch.ones(MICRO, SEQ, dtype=torch.long)
        mask[1, SEQ - 5:] = 0
        mask[3, SEQ - 9:] = 0
        labels = torch.randint(5, VOCAB, (MICRO, SEQ), generator=g)
        labels[(torch.rand(MICRO, SEQ, generator=g) > 0.15) | (mask == 0)] = -100
        types = torch.zeros(MICRO, SEQ, dtype=torch.long)
        types[:, SEQ // 2:] = 1
        out.append({"input_ids": torch.randint(5, VOCAB, (MICRO, SEQ), generator=g), "token_type_ids": types,
                    "attention_mask": mask, "mlm_labels": labels,
                    "pair_label": torch.randint(0, 2, (MICRO,), generator=g)})
    return out


def random_bert(cfg, seed: int) -> dict[str, torch.Tensor]:
    """Full TP=1 BertModel weights: megatron's init plus N(0, 0.2^2) noise (mp_utils.randomize)."""
    from largelm.model.registry import get_arch

    arch = get_arch("bert")
    model = randomize(arch.build_model(cfg.model, cfg.parallel, *arch.section_args(cfg), dtype=torch.float32), seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def save_teacher(cfg, root, state: dict) -> None:
    """``state`` saved as a TP=1 training checkpoint by a real engine (in a one-rank parallel state)."""
    from largelm.checkpoint.manager import CheckpointManager
    from largelm.config import dump_config
    from largelm.train.step import build_step

    step = build_step(cfg, 1, init_state_dict=state)
    meta = {"world_size": 1, "tensor_parallel": 1, "pipeline_parallel": 1, "zero_stage": cfg.parallel.zero_stage}
    CheckpointManager(root, config_yaml=dump_config(cfg), meta=meta).save(step.engine, 1, {})


def train_steps(cfg, student_state: dict, batches: list[dict]) -> dict:
    """Per step: the mean total loss, its parts and the global gradient norm; the projection weights at the end."""
    from largelm.parallel.cpu_compat import model_parallel_manual_seed
    from largelm.train.step import build_step

    torch.manual_seed(cfg.train.seed)
    model_parallel_manual_seed(cfg.train.seed)
    step = build_step(cfg, torch.distributed.get_world_size(), init_state_dict=student_state)
    out: dict = {"losses": [], "norms": [], **{p: [] for p in PARTS}}
    for s in range(STEPS):
        out["losses"].append(step.train_step(iter(batches[s * ACCUM:(s + 1) * ACCUM])).item())
        out["norms"].append(float(step.engine.get_global_grad_norm()))
        for part in PARTS:
            out[part].append(step.last_metrics[f"distill/{part}"])
    projection = getattr(step.engine.module, "distill_projection", None)
    out["projection"] = None if projection is None else projection.weight.detach().flatten().tolist()
    return out


def _tp2_rank(rank, world_size, case):
    from megatron.core import parallel_state

    from largelm.config import config_from_dict
    from largelm.parallel import groups
    from largelm.parallel.sharding import shard_tensor
    from largelm.train.distill_bert import BertDistillLoss

    groups.init_distributed()
    try:
        out = {}
        for layout in ("tp2", "tp2-sp-proj"):
            groups.init_model_parallel(tensor_parallel=2, pipeline_parallel=1)
            cfg = config_from_dict(raw_config(case["tokenizer"], case["teacher"], layout))
            out[layout] = train_steps(cfg, case["students"][LAYOUTS[layout][3]], case["batches"])
            parallel_state.destroy_model_parallel()
        groups.init_model_parallel(tensor_parallel=2, pipeline_parallel=1)
        cfg = config_from_dict(raw_config(case["tokenizer"], case["teacher"], "tp2", student_init="every_kth_layer"))
        loss = BertDistillLoss(cfg)
        init, teacher = loss.student_init, case["teacher_state"]
        errors = {}
        for name in ("encoder.layers.1.self_attention.linear_qkv.weight", "encoder.layers.1.mlp.linear_fc2.weight",
                     "embedding.word_embeddings.weight", "output_layer.bias", "lm_head.dense.weight",
                     "pooler.dense.weight", "binary_head.weight"):
            full = teacher[name.replace("layers.1.", "layers.2.")]
            if name in ("embedding.word_embeddings.weight", "output_layer.bias"):
                full = torch.cat([full[:VOCAB], torch.zeros_like(full[VOCAB:])])  # padding rows read as zeros
            dim = 1 if "linear_fc2" in name else 0
            partitioned = any(k in name for k in ("linear_qkv", "linear_fc2", "word_embeddings", "output_layer"))
            expected = shard_tensor(full, rank, 2, dim) if partitioned else full
            errors[name] = (init[name] - expected).abs().max().item()
        out["init_err"], out["sources"] = errors, loss.teacher_sources
        return out
    finally:
        groups.destroy()


@pytest.mark.slow
@pytest.mark.numerics
def test_tp2_bert_pair_equals_tp1_pair(tmp_path, tokenizer_path, monkeypatch):
    from largelm.config import config_from_dict

    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it (normally set by the launcher)
    teacher = str(tmp_path / "teacher")
    batches = masked_batches(STEPS)
    refs = {}
    with single_rank_parallel_state():
        teacher_cfg = config_from_dict({k: v for k, v in raw_config(tokenizer_path, teacher, "ref",
                                                                    TEACHER_LAYERS).items() if k != "distill"})
        teacher_state = random_bert(teacher_cfg, seed=1)
        save_teacher(teacher_cfg, teacher, teacher_state)
        students = {}
        for layout in ("ref", "ref-proj"):
            cfg = config_from_dict(raw_config(tokenizer_path, teacher, layout))
            students[LAYOUTS[layout][3]] = random_bert(cfg, seed=2)
            refs[layout] = train_steps(cfg, students[LAYOUTS[layout][3]], batches)
    case = dict(tokenizer=str(tokenizer_path), teacher=teacher, students=students, batches=batches,
                teacher_state=teacher_state)
    per_rank = run_ranks(_tp2_rank, 2, case, timeout_s=300)
    for rank, res in enumerate(per_rank):
        assert all(e == 0.0 for e in res["init_err"].values()), f"rank {rank}: every_kth_layer shard {res['init_err']}"
        assert res["sources"] == [0], res["sources"]  # a TP=1 teacher: its one TP rank
    for layout, ref_name in (("tp2", "ref"), ("tp2-sp-proj", "ref-proj")):
        ref, runs = refs[ref_name], [r[layout] for r in per_rank]
        print(f"\n{layout}: worst rel diff " + " ".join(
            f"{k} {max(rel_diff(r[k][s], ref[k][s]) for r in runs for s in range(STEPS)):.1e}"
            for k in ("losses", "norms", *PARTS)))
        assert_steps_match(layout, runs, ref, STEPS, RTOL, RTOL, ref_name=ref_name)
        for rank, run in enumerate(runs):
            for part in PARTS:
                for s in range(STEPS):
                    assert rel_diff(run[part][s], ref[part][s]) < RTOL, \
                        f"{layout} rank {rank} step {s + 1}: {part} {run[part][s]} vs {ref_name} {ref[part][s]}"
        assert ref["kl"][0] > 0.05 and ref["hidden"][0] > 0.05 and ref["attention"][0] > 1e-3, ref
        assert ref["norms"][0] > 1.0  # clipping was active: the norm fed the update
    proj = [r["tp2-sp-proj"]["projection"] for r in per_rank]
    assert proj[0] == proj[1], "the replicated projection drifted apart on the TP ranks"
    ref_proj = torch.tensor(refs["ref-proj"]["projection"])
    assert (torch.tensor(proj[0]) - ref_proj).abs().max() <= RTOL * ref_proj.abs().max()

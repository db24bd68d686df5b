"""In-training lm-eval on layouts where no rank holds the whole model (tensor parallel, pipeline parallel, ZeRO-3):
every forward is a collective driven by rank 0 (largelm/train/harness_eval.py). The values logged to tensorboard
equal a TP=1 evaluation of the checkpoint saved at the same step, within the error model of tests/test_lm_eval.py:
a log-probability moves by at most ``logprob_tolerance`` per token between two fp32 evaluations that differ only in
summation order (TP splits the reductions, the pipeline and ZeRO-3 do not change them), so the sum ``S`` of the
log-likelihoods over the ``N`` scored tokens by ``N`` times that; the perplexity task's metrics are functions of
``S`` (word/byte perplexity ``exp(-S/W)``, ``exp(-S/B)``; bits per byte ``-S/(B ln 2)``), and tensorboard stores
fp32 (one more relative eps). Training goes on after the evaluation and its losses equal those of the same run
without it (the evaluation leaves every rank's RNGs, modes and data position as they were).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_lm_eval import EPS32, SMALL_COUNTS, logprob_tolerance
from train_utils import check_ok, launch, losses, tiny_config

from largelm.evaluate.model import single_rank
from largelm.generation.load import load_causal_lm
from largelm.model.harness import LargelmLM, flat_metrics, run_harness
from largelm.prepare.eval_tasks import make_eval_tasks

TASKS = ["largelm_perplexity", "largelm_next_line_gen"]
LIMIT = 2
PPL = "eval/largelm_perplexity/"


@pytest.fixture(scope="module")
def task_dir(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_tasks")
    make_eval_tasks([small_corpus], out, valid_fraction=0.2, counts=SMALL_COUNTS)
    return out


def _run(tmp_path, tokenizer_path, shard_dir, seq, task_dir, parallel: dict, tasks=tuple(TASKS), limit=LIMIT):
    tmp_path.mkdir(parents=True, exist_ok=True)
    sections = dict(train={"steps": 3, "grad_accum_steps": 2, "eval_interval": 0, "log_interval": 1},
                    parallel=parallel, checkpoint={"save_interval": 2})
    if tasks:
        sections["eval"] = {"tasks": list(tasks), "interval": 2, "limit": limit, "task_dir": str(task_dir),
                            "batch_size": 2}
    return check_ok(launch(tiny_config(tmp_path, tokenizer_path, shard_dir, seq, **sections), nproc=2))


def _logged(tb_dir) -> dict[str, float]:
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith("eval/"):
            [event] = events.Scalars(tag)  # one evaluation, at step 2
            assert event.step == 2, tag
            out[tag] = event.value
    return out


def _reference_and_tolerances(step_dir, task_dir) -> tuple[dict[str, float], dict[str, float]]:
    """The TP=1 evaluation of ``step_dir`` and, per perplexity metric, its tolerance (module docstring)."""
    with single_rank():
        loaded = load_causal_lm(step_dir)
        model, tok, cfg = loaded.module, loaded.tokenizer, loaded.model
        ref = flat_metrics(run_harness(LargelmLM(model, tok, max_length=cfg.seq_length, batch_size=2), TASKS,
                                       task_dir, limit=LIMIT, bootstrap_iters=0, quiet=True))
        docs = [json.loads(line)["text"] for line in
                (task_dir / "largelm_perplexity.jsonl").read_text().splitlines()[:LIMIT]]
        ids = [[tok.eos_id] + tok.encode(d) for d in docs]
        max_logit = 0.0
        with torch.no_grad():
            for seq in ids:
                for i in range(0, len(seq), cfg.seq_length):
                    window = torch.tensor([seq[i:i + cfg.seq_length]])
                    positions = torch.arange(window.shape[1]).unsqueeze(0)
                    max_logit = max(max_logit, float(model(window, positions, None)[..., :tok.vocab_size].abs().max()))
    total = logprob_tolerance(cfg, max_logit, sum(len(s) - 1 for s in ids))  # |delta S|
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    size = sum(len(d.encode("utf-8")) for d in docs)
    log_tol = {"word_perplexity": total / words, "byte_perplexity": total / size}
    abs_tol = {"bits_per_byte": total / (size * math.log(2))}
    return ref, {**log_tol, **abs_tol}


def _check_equal_to_tp1(logged: dict[str, float], step_dir, task_dir) -> None:
    ref, tols = _reference_and_tolerances(step_dir, task_dir)
    for metric in ("word_perplexity", "byte_perplexity"):
        a, b = logged[PPL + metric], ref[PPL + metric]
        assert abs(math.log(a) - math.log(b)) <= tols[metric] + 2 * EPS32, (metric, a, b, tols[metric])
    a, b = logged[PPL + "bits_per_byte"], ref[PPL + "bits_per_byte"]
    assert abs(a - b) <= tols["bits_per_byte"] + 2 * EPS32 * abs(b), (a, b, tols["bits_per_byte"])
    # the generation task ran (greedy generation through the collective forward, stopped at the newline)
    assert "eval/largelm_next_line_gen/exact_match/strip" in logged, sorted(logged)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [{"tensor_parallel": 2, "zero_stage": 1},
                                      {"pipeline_parallel": 2, "zero_stage": 1},
                                      {"zero_stage": 3}], ids=["tp2", "pp2", "zero3"])
def test_in_training_eval_equals_the_tp1_eval_of_the_same_weights(tmp_path, tokenizer_path, shard_dir,
                                                                    shard_seq_length, task_dir, parallel):
    out = _run(tmp_path, tokenizer_path, shard_dir, shard_seq_length, task_dir, parallel)
    assert "lm-eval at step 2:" in out
    assert sorted(losses(out)) == [1, 2, 3]  # training went on after the evaluation
    _check_equal_to_tp1(_logged(tmp_path / "tb"), tmp_path / "ckpt" / "step_00000002", task_dir)


def _train_curve(tb_dir) -> list[tuple[int, float, float]]:
    """(step, loss, gradient norm) as tensorboard holds them."""
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return [(a.step, a.value, b.value) for a, b in zip(events.Scalars("train/loss"), events.Scalars("train/grad_norm"))]


@pytest.mark.slow
def test_in_training_eval_at_tp2_leaves_training_unchanged(tmp_path, tokenizer_path, shard_dir, shard_seq_length,
                                                          task_dir):
    """Steps after a collective evaluation are bit for bit those of the same run without one."""
    parallel = {"tensor_parallel": 2, "zero_stage": 1}
    out = _run(tmp_path / "a", tokenizer_path, shard_dir, shard_seq_length, task_dir, parallel,
               tasks=["largelm_perplexity"], limit=1)
    assert "lm-eval at step 2:" in out
    _run(tmp_path / "b", tokenizer_path, shard_dir, shard_seq_length, task_dir, parallel, tasks=())
    with_eval, without = _train_curve(tmp_path / "a" / "tb"), _train_curve(tmp_path / "b" / "tb")
    assert [s for s, _, _ in with_eval] == [1, 2, 3]
    assert with_eval == without

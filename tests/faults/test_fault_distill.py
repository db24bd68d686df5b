"""Exact resume of a knowledge-distillation run under SIGKILL: a BERT student (2 ranks, ZeRO-2, fp32, dropout on,
KL + MLM/SOP + hidden-state and attention-map alignment) learning from a frozen BERT teacher is killed at a random
step after its first checkpoint and restarted. The resumed run must reproduce the uninterrupted run's per-step
losses and distillation parts bit for bit, and end with a byte-identical checkpoint (the teacher is rebuilt from its
checkpoint on restart; the student's init from the teacher is overwritten by the resumed state).
"""

from __future__ import annotations

import pytest
import yaml
from faultkit import (
    RunConfig,
    random_kill_step,
    run,
    scalar_differences,
    sigkill_then_resume,
    state_differences,
    tb_scalars,
)
from mp_utils import single_rank_parallel_state

from largelm.config import config_from_dict
from largelm.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

STEPS = 6
TAGS = ("train/loss", "distill/kl", "distill/mlm_loss", "distill/sop_loss", "distill/hidden", "distill/attention")


def _bert_sections(**model) -> dict:
    return dict(model={"arch": "bert", "seq_length": 64, **model}, bert={"objective": "sop"},
                train={"steps": STEPS, "grad_accum_steps": 1})


def _teacher(config_for, tokenizer_path, tmp_path, monkeypatch):
    """A 4-layer BERT teacher trained 2 steps in this process (one gloo rank) and saved as a checkpoint."""
    from test_distill_bert import train_and_save_teacher

    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it (normally set by the launcher)
    config = config_for(tmp_path / "teacher", **_bert_sections(num_layers=4, hidden_dropout=0.0,
                                                               attention_dropout=0.0))
    raw = yaml.safe_load(config.read_text())
    raw["model"]["vocab_size"] = Tokenizer.load(tokenizer_path).vocab_size  # what preflight resolves for launches
    with single_rank_parallel_state():
        train_and_save_teacher(config_from_dict(raw), tmp_path / "teacher" / "ckpt")
    return tmp_path / "teacher" / "ckpt"


def test_sigkill_of_a_bert_distillation_run_resumes_bit_exact(tokenizer_path, bert_shards, tmp_path, monkeypatch,
                                                               ledger):
    config_for = RunConfig(tokenizer_path, bert_shards, 64)
    teacher = _teacher(config_for, tokenizer_path, tmp_path, monkeypatch)
    distill = {"teacher": str(teacher), "alpha": 0.5, "student_init": "every_kth_layer", "k": 2,
               "hidden_weight": 1.0, "hidden_loss": "cosine+mse", "attention_weight": 1.0}
    reference = config_for(tmp_path / "reference", **_bert_sections(num_layers=2), distill=distill)
    run(reference).check_ok()
    expected = tb_scalars(tmp_path / "reference" / "tb")

    seed, kill_step = random_kill_step(3, STEPS - 1)  # after the first checkpoint (step 2), before the end
    with ledger.scenario(f"SIGKILL of a BERT distillation run at step {kill_step} (seed {seed}; 2 ranks, ZeRO-2, "
                         "teacher + hidden/attention alignment)") as sc:
        config = config_for(tmp_path / "killed", **_bert_sections(num_layers=2), distill=distill)
        root = tmp_path / "killed" / "ckpt"
        latest = sigkill_then_resume(config, kill_step, root, resumed_tensorboard=tmp_path / "killed" / "tb-resumed")
        lost = scalar_differences(tb_scalars(tmp_path / "killed" / "tb-resumed"), expected, TAGS,
                                  range(latest.step + 1, STEPS + 1))
        lost += state_differences(tmp_path / "reference" / "ckpt" / f"step_{STEPS:08d}", root / f"step_{STEPS:08d}")
        sc["data_lost"] = len(lost)
        assert not lost, f"resumed distillation run differs from the uninterrupted one: {lost[:20]}"

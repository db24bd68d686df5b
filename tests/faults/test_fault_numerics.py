"""Numerical faults: a NaN loss or NaN gradients on any rank skip the step (no update, LR schedule held), are
counted and logged; corrupted weights make every step bad and the run aborts after ``train.max_bad_steps`` with
a clear message, without checkpointing the damaged weights; loss spikes are detected and counted."""

from __future__ import annotations

import math
import re

import pytest
import torch
from faultkit import run, single_rank_step, tb_scalars

from largelm.checkpoint.manager import list_checkpoints
from largelm.parallel.deepspeed_compat import safe_torch_load


@pytest.mark.slow
def test_nan_steps_are_skipped_and_persistent_nans_abort(run_config, tmp_path, ledger):
    config = run_config(tmp_path, train={"steps": 12, "max_bad_steps": 3, "loss_spike_factor": 3.0},
                        checkpoint={"save_interval": 2, "keep_last": 2})
    # 3: NaN loss on rank 1 only; 4: NaN gradients on rank 0 only (loss finite); 7: a 50x loss spike;
    # 8: a weight becomes NaN (on both ranks' replica) -> steps 8, 9, 10 bad -> abort at 10.
    result = run(config, faults="nan_loss@3:rank=1,nan_grad@4:rank=0,loss_spike@7,nan_weight@8")
    out = result.output
    tb = tb_scalars(tmp_path / "tb")
    loss, lr, skipped = tb["train/loss"], tb["train/lr"], tb["train/skipped_steps"]

    with ledger.scenario("NaN loss on one rank (forward overflow): step skipped on every rank"):
        assert "step 3: skipped: non-finite loss nan on some rank; update not applied (1 in a row, 1 skipped" in out
        assert math.isnan(loss[3]) and skipped[3] == 1
        assert lr[3] == lr[2]  # the LR schedule did not advance for the skipped update

    with ledger.scenario("NaN gradients with a finite loss on one rank (backward overflow): step skipped"):
        assert re.search(r"step 4: skipped: non-finite gradients \(loss [0-9.]+, grad norm inf\)", out), out[-4000:]
        assert math.isfinite(loss[4]) and skipped[4] == 2 and lr[4] == lr[2]
        # The skipped updates did not damage the model: the next steps train normally and advance the LR.
        assert all(math.isfinite(loss[s]) for s in (5, 6)) and skipped[6] == 2
        assert lr[5] < lr[4] and loss[6] < loss[1]
        # No checkpoint right after a skipped step: step 4's save waited for the good step 5.
        assert "step 4: checkpoint postponed (the step was skipped)" in out and "step_00000005" in out

    with ledger.scenario("loss spike (50x) detected, logged and counted"):
        assert re.search(r"step 7: loss spike: [0-9.]+ is more than 3x the running mean", out), out[-4000:]
        assert tb["train/loss_spikes"][7] == 1 and tb["train/loss_spikes"][6] == 0

    with ledger.scenario("NaN weights: consecutive bad steps abort with a clear message", injected=1) as sc:
        assert result.returncode == 1, out[-4000:]
        assert re.search(r"error: aborting at step 10: 3 consecutive steps with non-finite loss or gradients "
                         r"\(train.max_bad_steps=3\).*last checkpoint: \S+step_00000006", out), out[-4000:]
        assert sorted(loss) == list(range(1, 11)) and skipped[10] == 5
        assert "step 8: checkpoint postponed" in out
        # The damaged weights were never checkpointed; the last checkpoint is finite and `latest` points at it.
        root = tmp_path / "ckpt"
        assert [c.step for c in list_checkpoints(root)] == [5, 6] and (root / "latest").read_text() == "step_00000006"
        weights = safe_torch_load(root / "step_00000006" / "mp_rank_00_model_states.pt")["module"]
        damaged = [k for k, v in weights.items() if torch.is_tensor(v) and not torch.isfinite(v).all()]
        sc["data_lost"] = len(damaged)
        assert not damaged


def _micro_steps(step, tokens, poison_first: bool):
    """One optimizer step (grad_accum micro-batches) through the engine; the first one gets NaN gradients."""
    from largelm.faults import NanGrad
    from largelm.model.gpt import gpt_forward_loss

    engine = step.engine
    engine.train()
    for i in range(engine.gradient_accumulation_steps()):
        per_token, loss = gpt_forward_loss(engine, tokens)
        if poison_first and i == 0:
            loss = NanGrad.apply(loss)
        engine.backward(loss)
        engine.step()


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_optimizer_skips_nan_steps(run_config, tmp_path, ledger, zero_stage, precision):
    """Each optimizer DeepSpeed builds for our configs (torch AdamW for ZeRO-0 fp32 - guarded by
    ``install_overflow_guard`` -, FP16_UnfusedOptimizer, BF16_Optimizer, ZeRO-1/2, ZeRO-3) skips an update with
    NaN gradients: parameters untouched, LR held, counted; the next clean step updates normally. Its checkpoint
    then round-trips through the weights-only loader (the allowlist covers what it stores)."""
    from largelm.checkpoint.manager import Checkpoint, CheckpointManager
    from largelm.parallel.deepspeed_compat import install_overflow_guard

    # as_configured: one rank would otherwise run the cheapest engine (deepspeed_config.engine_zero_stage)
    sections = dict(parallel={"zero_stage": zero_stage, "single_replica_zero": "as_configured"},
                    train={"precision": precision})
    with ledger.scenario(f"NaN gradients, ZeRO-{zero_stage} {precision} (one rank, in process)"), \
            single_rank_step(run_config, tmp_path, **sections) as (cfg, step):
        engine = step.engine
        assert install_overflow_guard(engine) == (zero_stage == 0 and precision == "fp32")
        tokens = torch.randint(1, 1000, (cfg.train.micro_batch_size, cfg.model.seq_length + 1),
                               generator=torch.Generator().manual_seed(0))
        before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        lr = engine.get_lr()[0]
        _micro_steps(step, tokens, poison_first=True)
        assert not engine.was_step_applied() and engine.skipped_steps == 1
        assert engine.get_lr()[0] == lr
        changed = [n for n, p in engine.module.named_parameters() if not torch.equal(p, before[n])]
        assert not changed, changed
        _micro_steps(step, tokens, poison_first=False)  # the next clean step updates normally
        assert engine.was_step_applied() and engine.get_lr()[0] != lr
        assert all(torch.isfinite(p).all() for p in engine.module.parameters())
        assert any(not torch.equal(p, before[n]) for n, p in engine.module.named_parameters())

        manager = CheckpointManager(tmp_path / "ckpt")
        path = manager.save(engine, 2, {"step": 2})
        assert manager.load(engine, Checkpoint(path, 2)) == {"step": 2}

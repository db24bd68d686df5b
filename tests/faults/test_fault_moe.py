"""Exact resume of a mixture-of-experts run (``model.arch: moe``, 2 ranks, expert_parallel=2, ZeRO-2, fp32): the job
is SIGKILLed at a random step and restarted; the resumed run must reproduce the uninterrupted run's per-step losses
and router metrics bit for bit and end with a byte-identical checkpoint.

What it proves beyond the dense case: each expert-parallel rank's experts come back as that rank's (the ZeRO
partitions of the expert groups are per expert-data-parallel group; the module file holds data-parallel rank 0's
experts only, and ZeRO restores every rank's from its fp32 partition), and the router's input jitter draws from
the restored RNG streams.
"""

from __future__ import annotations

import pytest
from faultkit import random_kill_step, run, scalar_differences, sigkill_then_resume, state_differences, tb_scalars

pytestmark = pytest.mark.slow

MOE_RUN = dict(
    model={"arch": "moe", "style": "llama",
           "moe": {"num_experts": 4, "top_k": 2, "ffn_size": 32,
                   "router": {"aux_loss_coeff": 0.01, "z_loss_coeff": 0.001, "input_jitter_eps": 0.01}}},
    parallel={"expert_parallel": 2},
)
COMPARED = ("train/loss", "train/aux_loss", "train/z_loss", "train/expert_share_entropy", "train/grad_norm")


def test_moe_sigkill_at_random_step_resumes_bit_exact(run_config, tmp_path, ledger):
    seed, kill_step = random_kill_step(3, 7)  # after the first checkpoint (step 2), before the end
    reference = run(run_config(tmp_path / "reference", **MOE_RUN))
    reference.check_ok()
    expected = tb_scalars(tmp_path / "reference" / "tb")
    with ledger.scenario(f"SIGKILL of an MoE job (EP=2) at step {kill_step} (seed {seed}; 2 ranks, ZeRO-2)") as sc:
        config = run_config(tmp_path / "run", **MOE_RUN)
        root = tmp_path / "run" / "ckpt"
        # same tensorboard dir: the resumed steps overwrite nothing before latest.step
        latest = sigkill_then_resume(config, kill_step, root)
        lost = scalar_differences(tb_scalars(tmp_path / "run" / "tb"), expected, COMPARED, range(latest.step + 1, 9))
        lost += state_differences(tmp_path / "reference" / "ckpt" / "step_00000008", root / "step_00000008")
        sc["data_lost"] = len(lost)
        assert not lost, f"resumed MoE run differs from the uninterrupted one: {lost[:20]}"

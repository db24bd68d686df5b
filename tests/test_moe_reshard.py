"""Elastic resume of a mixture-of-experts checkpoint (``model.arch: moe``) in another layout, expert-parallel size
included (largelm/checkpoint/elastic.py): each expert-parallel rank of the new layout takes its experts (global
expert ``ep_rank * E/EP + local``) from the checkpoint's consolidated state - weights, fp32 masters and both Adam
moments.

One fp32 source run (DP=2, EP=2, ZeRO-2: expert groups partitioned over the expert-data-parallel group, 3 of 6
steps) is shared by the module. As in tests/test_elastic_resume.py (whose helpers these tests use), each hop
resumes a copy of the checkpoint resharded with the real Trainer, saves at the same step, and the new checkpoint
unsharded again (reader.consolidate_states) must equal the source's exactly (torch.equal): every master, moment,
Adam step, LR scheduler state and counter.

Losses: steps 4-6 resumed at EP=1 from the EP=2 checkpoint

* equal exactly those of the hop's EP=1 checkpoint resumed on DeepSpeed's plain same-layout path (same engine,
  layout, fp32 state and data: every reduction in the same order);
* match the EP=2 run continued uninterrupted (same DP size, data and state) within the expert-parallel parity
  tolerance of tests/test_moe.py: EP changes only the summation order (experts' matmuls over gathered vs local
  tokens, gradient sums over other ranks), so per step one forward and backward reduction chain
  (tests/tolerances.py ``sum_rtol``), as the parity tests there assert for 3 steps.
"""

from __future__ import annotations

import shutil

import pytest
from mp_utils import rel_diff
from test_elastic_resume import DATA, LOGGING, RESHARD, _assert_same_state, _hop, _run
from tolerances import chain_length, sum_rtol
from train_utils import tiny_config

from largelm.checkpoint.elastic import read_reshard_source
from largelm.checkpoint.info import inspect_checkpoint, locate_checkpoint

pytestmark = pytest.mark.slow

MOE = {"num_experts": 4, "top_k": 2, "ffn_size": 32}
MODEL = {"arch": "moe", "style": "llama", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
         "ffn_hidden_size": 32, "moe": MOE}
TRAIN = {"steps": 6, "exit_interval": 3, "micro_batch_size": 4, "grad_accum_steps": 1}
EP1 = ["parallel.expert_parallel=1"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer_path, shard_dir, shard_seq_length):
    """DP=2 EP=2 ZeRO-2 fp32, 3 of 6 steps: a checkpoint at step 3 mid-schedule."""
    tmp = tmp_path_factory.mktemp("moe_reshard")
    config = tiny_config(tmp, tokenizer_path, shard_dir, shard_seq_length, logging=LOGGING, data=DATA,
                         model=MODEL, parallel={"zero_stage": 2, "expert_parallel": 2}, train=TRAIN)
    _run(config, 2)
    return {"tmp": tmp, "config": config, "ckpt": tmp / "ckpt"}


@pytest.fixture(scope="module")
def ep1(source):
    return _hop(source["ckpt"], source["tmp"], "ep1", 2, EP1, source["config"])


def _copy(root, config, tmp, name):
    """A copy of checkpoint root ``root`` and its config pointing at it (the original stays at step 3)."""
    copy = tmp / name
    shutil.copytree(root, copy)
    copied = tmp / f"{name}.yaml"
    copied.write_text(config.read_text().replace(str(root), str(copy)))
    return copied


def test_ep2_to_ep1_to_ep2_carries_experts_and_optimizer_bit_exactly(source, ep1):
    root, _ = ep1
    assert read_reshard_source(locate_checkpoint(root)).info.config.parallel.expert_parallel == 1
    _assert_same_state(source["ckpt"], root)
    back, _ = _hop(root, source["tmp"], "ep2_again", 2, [], source["config"])  # EP=1 -> EP=2
    assert read_reshard_source(locate_checkpoint(back)).info.config.parallel.expert_parallel == 2
    _assert_same_state(source["ckpt"], back)


def test_dp2_ep2_to_one_rank_carries_experts_and_optimizer_bit_exactly(source):
    """DP=2 EP=2 -> DP=1 EP=1 (one replica: DeepSpeed runs ZeRO-0, torch AdamW on the parameters)."""
    root, _ = _hop(source["ckpt"], source["tmp"], "one_rank", 1, EP1, source["config"])
    assert read_reshard_source(locate_checkpoint(root)).info.world_size == 1
    _assert_same_state(source["ckpt"], root)


def test_resumed_at_ep1_continues_like_ep1_and_like_ep2(source, ep1, tmp_path):
    hop_root, hop_config = ep1
    reference = _run(_copy(hop_root, hop_config, tmp_path, "reference"), 2, EP1)  # plain same-layout load
    resumed = _run(_copy(source["ckpt"], source["config"], tmp_path, "resharded"), 2, [*EP1, *RESHARD])
    continued = _run(_copy(source["ckpt"], source["config"], tmp_path, "continued"), 2)  # EP=2, uninterrupted
    assert reference["start"] == resumed["start"] == continued["start"] == 3
    assert [s for s, _ in resumed["history"]] == [4, 5, 6]
    assert resumed["history"] == reference["history"], (resumed["history"], reference["history"])
    cfg = inspect_checkpoint(locate_checkpoint(source["ckpt"]), checksums=False).config  # vocab_size resolved
    rtol = sum_rtol(chain_length(layers=1, hidden=32, ffn=MOE["ffn_size"], seq=cfg.model.seq_length, heads=4,
                                 vocab=cfg.model.padded_vocab_size(1), extra=MOE["num_experts"] + MOE["top_k"],
                                 tokens=cfg.tokens_per_step(2), backward=True))
    for (step, loss), (_, ep2_loss) in zip(resumed["history"], continued["history"]):
        assert rel_diff(loss, ep2_loss) < rtol, f"step {step}: EP=1 resumed {loss} vs EP=2 continued {ep2_loss}"

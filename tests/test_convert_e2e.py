"""Checkpoint conversion on checkpoints written by real training runs (the Trainer on 2 gloo ranks).

Logit checks compare two fp32 forwards of the same weights in different layouts or libraries: ``tolerances.logit_tol``
(the logits' reduction chain, relative to max(1, max |logit|)); a loss likewise (``fp32_rounding_tol``).

* a GPT-2-style model trained 3 steps at TP=2 with ZeRO-3 (fp32), a Llama-style GQA model trained 2 steps at
  DP=2 with ZeRO-1 (bf16: DeepSpeed's BF16_Optimizer), an untied GPT-2-style model at DP=2 with ZeRO-0 (bf16)
  and a tied one at PP=2 with ZeRO-1 (DeepSpeed's pipeline engine): consolidation equals the live engines' fp32
  master weights exactly, and the consolidated model's logits (through the independent reference GPT) equal the
  live TP=2 model's;
* TP=2 step 2 -> resharded to TP=1 with the optimizer carried (masters and Adam moments unshard to the source's
  bit for bit) -> the real trainer resumes it and its step-3 loss equals the TP=2 run's step-3 loss (same
  weights, same data position);
* the consolidated model -> a PP=2 checkpoint (written by DeepSpeed's pipeline engine) -> consolidated again
  gives bit-identical tensors (TP=2 x PP=2 too: 4 ranks, ~25 s on 2 cores);
* the DP=2 bf16 checkpoint -> Hugging Face LlamaForCausalLM: transformers' logits match, AutoTokenizer works;
  that Hugging Face directory -> a TP=2 training checkpoint at step 0 (continued pretraining);
* corrupt, incomplete and partial checkpoints are refused with the file named.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mp_utils import free_port, run_ranks
from reference_gpt import RefConfig, ReferenceGPT
from tolerances import fp32_rounding_tol, logit_tol, max_err, model_chain
from train_utils import tiny_config

from largelm.checkpoint.consolidated import load_consolidated
from largelm.checkpoint.elastic import read_reshard_source
from largelm.checkpoint.full_weights import load_full_weights
from largelm.convert import api, verify
from largelm.model.layout import VOCAB_PARALLEL

pytestmark = pytest.mark.slow

LOGGING = {"tensorboard_dir": None, "progress_bar": False, "peak_tflops_per_rank": 1.0}
DATA = {"num_workers": 0}  # the ranks are daemonic processes: no DataLoader worker processes


def _train_rank(rank, world_size, configs, ports):
    """Train each config with the real Trainer; return its loss history, the live fp32 master weights of this
    rank (with megatron's partition attributes) and the live model's full-vocabulary logits on the fixed batch."""
    import os

    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param
    from megatron.core import parallel_state

    from largelm.config import load_config
    from largelm.train.preflight import preflight
    from largelm.train.trainer import Trainer

    out = []
    for path, port in zip(configs, ports):
        os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous per run (the previous store may linger)
        cfg = preflight(load_config(path), world_size)
        trainer = Trainer(cfg)
        try:
            history = trainer.fit()
            zero0 = {}  # ZeRO-0 + bf16: DeepSpeed's FP16 optimizer holds the fp32 masters per parameter group
            optimizer = trainer.engine.optimizer
            for low, high in zip(getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups", [])):
                zero0.update({id(p): m for p, m in zip(low, high)})
            live = {}
            for name, param in trainer.engine.module.named_parameters():
                master = safe_get_full_fp32_param(param)
                master = zero0.get(id(param)) if master is None else master
                live[name] = ((master if master is not None else param).detach().float().numpy(),
                              bool(getattr(param, "tensor_model_parallel", False)),
                              getattr(param, "partition_dim", -1), getattr(param, "partition_stride", 1))
            logits = None
            if cfg.parallel.pipeline_parallel == 1:
                tokens = verify.fixed_tokens(cfg.model)
                trainer.engine.eval()
                with torch.no_grad():
                    local = trainer.engine(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None).float()
                tp_group = parallel_state.get_tensor_model_parallel_group()
                parts = [torch.empty_like(local) for _ in range(dist.get_world_size(tp_group))]
                dist.all_gather(parts, local.contiguous(), group=tp_group)
                logits = torch.cat(parts, -1).numpy()
            out.append({"history": history, "live": live, "logits": logits,
                        "tp_rank": parallel_state.get_tensor_model_parallel_rank()})
        finally:
            trainer.close()
    return out


def _resume_rank(rank, world_size, config):
    from largelm.config import load_config
    from largelm.train.preflight import preflight
    from largelm.train.trainer import Trainer

    cfg = preflight(load_config(config), world_size)  # the launcher's checks, incl. checkpoint compatibility
    trainer = Trainer(cfg)
    try:
        return {"start": trainer.step, "history": trainer.fit()}
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_path, shard_dir, shard_seq_length):
    gpt = tmp_path_factory.mktemp("gpt_tp2_zero3")
    llama = tmp_path_factory.mktemp("llama_dp2_zero1_bf16")
    zero0 = tmp_path_factory.mktemp("gpt_dp2_zero0")
    pipe = tmp_path_factory.mktemp("gpt_pp2_zero1")
    configs = [
        tiny_config(gpt, tokenizer_path, shard_dir, shard_seq_length, logging=LOGGING, data=DATA,
                    parallel={"tensor_parallel": 2, "zero_stage": 3, "single_replica_zero": "as_configured"},
                    train={"steps": 3}, checkpoint={"save_interval": 2}),
        tiny_config(llama, tokenizer_path, shard_dir, shard_seq_length, logging=LOGGING, data=DATA,
                    model={"style": "llama", "num_query_groups": 2, "tie_embeddings": False},
                    # bf16 + ZeRO-1 is DeepSpeed's BF16_Optimizer, whose partitions have their own format
                    parallel={"zero_stage": 1}, train={"steps": 2, "precision": "bf16"}),
        tiny_config(zero0, tokenizer_path, shard_dir, shard_seq_length, logging=LOGGING, data=DATA,
                    model={"tie_embeddings": False}, parallel={"zero_stage": 0},
                    train={"steps": 2, "precision": "bf16"}),
        tiny_config(pipe, tokenizer_path, shard_dir, shard_seq_length, logging=LOGGING, data=DATA,
                    parallel={"pipeline_parallel": 2, "zero_stage": 1}, train={"steps": 2}),
    ]
    per_rank = run_ranks(_train_rank, 2, [str(c) for c in configs], [free_port() for _ in configs], timeout_s=900)
    return {"gpt": (gpt / "ckpt", [r[0] for r in per_rank]), "llama": (llama / "ckpt", [r[1] for r in per_rank]),
            "zero0": (zero0 / "ckpt", [r[2] for r in per_rank]), "pipe": (pipe / "ckpt", [r[3] for r in per_rank])}


def _live_full(results) -> dict[str, torch.Tensor]:
    """Unshard the live TP-local weights with megatron's own partition attributes (pipeline stages: merged
    under GPTModel names; the tied embedding's two copies must agree)."""
    from largelm.model.layout import pipeline_name_to_gpt
    from largelm.parallel.sharding import unshard_tensors

    if any(not name.startswith(("embedding.", "decoder.", "output_layer")) for name in results[0]["live"]):
        merged = {}
        for r in results:
            for name, entry in r["live"].items():
                gpt = pipeline_name_to_gpt(name, 2)
                if gpt in merged:
                    np.testing.assert_array_equal(merged[gpt][0], entry[0])
                merged[gpt] = entry
        results = [{"tp_rank": 0, "live": merged}]
    by_tp = {r["tp_rank"]: r["live"] for r in results}
    full = {}
    for name, (value, is_tp, dim, stride) in by_tp[0].items():
        if is_tp and len(by_tp) > 1:
            full[name] = unshard_tensors([torch.from_numpy(by_tp[t][name][0]) for t in sorted(by_tp)], dim, stride)
        else:
            full[name] = torch.from_numpy(value)
    return full


def _assert_equals_live(hub, results):
    live = _live_full(results)
    assert sorted(live) == sorted(hub.tensors)
    vocab = hub.model.vocab_size
    for name, tensor in hub.tensors.items():
        expected = live[name][:vocab] if name in VOCAB_PARALLEL else live[name]
        assert torch.equal(tensor, expected), name
    for name, rows in hub.padding.items():
        assert torch.equal(rows, live[name][vocab:]), name


def test_zero3_tp2_consolidation_equals_live_model(runs, tmp_path):
    ckpt, results = runs["gpt"]
    checks = api.consolidate(ckpt, tmp_path / "hub", log=print)
    hub = load_consolidated(tmp_path / "hub")
    assert checks[0].ok and checks[0].max_abs_diff <= logit_tol(hub.model, checks[0].max_abs_logit)
    assert hub.step == 3 and hub.source["zero_stage"] == 3 and hub.source["tensor_parallel"] == 2
    _assert_equals_live(hub, results)
    # the consolidated weights, run by the plain-PyTorch reference, give the live TP=2 model's logits
    padded = hub.model.padded_vocab_size(1)
    ref = ReferenceGPT(RefConfig.from_model_config(hub.model, padded))
    ref.load_from_megatron(hub.padded_tensors(padded))
    with torch.no_grad():
        ours = ref(verify.fixed_tokens(hub.model))
    live = torch.from_numpy(results[0]["logits"])[..., :padded]
    assert ours.shape == live.shape and max_err(ours, live) <= logit_tol(hub.model, live.abs().max().item())


@pytest.mark.parametrize("run", ["gpt", "pipe"])
def test_tools_read_tensor_and_pipeline_parallel_checkpoints_directly(runs, run):
    """What quantization, generation and distillation teachers load (``load_full_weights``): a TP=2 (ZeRO-3) or
    PP=2 training checkpoint as the full weights of one TP=1/PP=1 model, equal to the live model's, no converter
    step; the config it returns describes that model."""
    ckpt, results = runs[run]
    cfg, state, _ = load_full_weights(ckpt, dtype=None)
    assert (cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.sequence_parallel) == (1, 1,
                                                                                                              False)
    live, vocab = _live_full(results), cfg.model.vocab_size
    assert sorted(state) == sorted(live)
    for name, tensor in state.items():
        if name in VOCAB_PARALLEL:  # padded to TP=1's multiple here, to the run's TP multiple live
            assert tensor.shape[0] == cfg.model.padded_vocab_size(1) and torch.equal(tensor[:vocab], live[name][:vocab])
        else:
            assert torch.equal(tensor, live[name]), name


def test_zero1_bf16_dp2_consolidation_and_hf_export(runs, tmp_path):
    from transformers import AutoTokenizer

    from largelm.tokenizer import Tokenizer

    ckpt, results = runs["llama"]
    api.consolidate(ckpt, tmp_path / "hub", log=print)
    hub = load_consolidated(tmp_path / "hub")
    assert hub.source["data_parallel"] == 2 and hub.source["precision"] == "bf16" and hub.dtype == torch.float32
    _assert_equals_live(hub, results)  # the fp32 masters, not the bf16 module weights
    checks = api.export_hf(ckpt, tmp_path / "hf", log=print)
    assert checks[0].ok and checks[0].max_abs_diff <= logit_tol(hub.model, checks[0].max_abs_logit)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    text = "To be, or not to be, that is the question."
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text, add_special_tokens=False) == \
        Tokenizer.load(hub.tokenizer).encode(text)


def test_zero0_bf16_consolidation_reads_the_fp32_masters(runs, tmp_path):
    ckpt, results = runs["zero0"]
    checks = api.consolidate(ckpt, tmp_path / "hub", log=print)
    hub = load_consolidated(tmp_path / "hub")
    assert hub.source["weights"] == ["fp32 master (ZeRO-0 optimizer)"]
    assert checks[0].max_abs_diff <= logit_tol(hub.model, checks[0].max_abs_logit)
    _assert_equals_live(hub, results)


def test_pp2_tied_consolidation_equals_live_model(runs, tmp_path):
    ckpt, results = runs["pipe"]
    api.consolidate(ckpt, tmp_path / "hub", verify_logits=False, log=print)  # PP logits: see the TP2xPP2 test
    hub = load_consolidated(tmp_path / "hub")
    assert hub.source["pipeline_parallel"] == 2 and hub.model.tie_embeddings
    _assert_equals_live(hub, results)


def test_tp2_checkpoint_resharded_to_tp1_resumes_in_the_trainer(runs, tmp_path):
    ckpt, results = runs["gpt"]
    out = tmp_path / "tp1"
    # verify_logits=False: the TP=2 source forward is the one test_zero3_tp2_... checks; the trainer's step-3
    # loss below is the stronger check here (the fp32 masters are still compared exactly on reload). The optimizer
    # is carried (the default): unsharded again, masters and Adam moments equal the TP=2 ZeRO-3 source's exactly.
    api.reshard(ckpt, out, tensor_parallel=1, tag="step_00000002", overrides=("train.steps=3",),
                verify_logits=False, log=print)
    step_dir = out / "step_00000002"
    source, carried = read_reshard_source(ckpt / "step_00000002"), read_reshard_source(step_dir)
    for kind, a, b in [("fp32", source.weights, carried.weights),
                       *[(k, source.moments[k], carried.moments[k]) for k in source.moments]]:
        assert set(a.tensors) == set(b.tensors)
        assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors), kind
        assert float(a.tensors["decoder.final_layernorm.weight"].abs().max()) > 0, kind
    assert float(carried.adam_step) == float(source.adam_step) == 2.0
    assert carried.engine_state["lr_scheduler"]["_last_lr"] == source.engine_state["lr_scheduler"]["_last_lr"]
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["tensor_parallel"] == 1 and manifest["zero_stage"] == 3
    record = json.loads((out / "conversion.json").read_text())
    assert record["data_state_kept"] and record["weights"]["weight_diff"] == 0.0
    assert record["optimizer_state"] == "carried (resharded from the source)"
    from largelm.parallel.deepspeed_compat import safe_torch_load

    before = safe_torch_load(ckpt / "step_00000002" / "trainer_state_rank00000.pt")
    after = safe_torch_load(step_dir / "trainer_state_rank00000.pt")
    assert after["step"] == 2 and after["data"] == before["data"] and after.get("guard") == before.get("guard")

    resumed = run_ranks(_resume_rank, 1, str(step_dir / "config.yaml"), timeout_s=600)[0]
    assert resumed["start"] == 2 and [s for s, _ in resumed["history"]] == [3]
    tp2_loss = dict(results[0]["history"])[3]
    # same weights, same batch (4 x 32 tokens x 2 micro-batches; 1000 ids padded to 1024): TP only reorders sums
    from largelm.config import load_config

    model = load_config(step_dir / "config.yaml").model
    tol = fp32_rounding_tol(model_chain(model, vocab=1024, tokens=4 * 32 * 2), abs(tp2_loss))
    assert resumed["history"][0][1] == pytest.approx(tp2_loss, abs=tol)


def _round_trip(runs, tmp_path, tp: int, pp: int) -> None:
    """consolidated -> TP x PP checkpoint (DeepSpeed's pipeline engine, tied embedding on both end stages)
    -> consolidated (verified against the checkpoint run in its own layout): bit-identical tensors and padding."""
    ckpt, _ = runs["gpt"]
    api.consolidate(ckpt, tmp_path / "hub", verify_logits=False, log=print)
    checks = api.reshard(tmp_path / "hub", tmp_path / "out", tensor_parallel=tp, pipeline_parallel=pp,
                         zero_stage=1, log=print)
    assert checks[0].max_abs_diff <= logit_tol(load_consolidated(tmp_path / "hub").model, checks[0].max_abs_logit)
    step_dir = tmp_path / "out" / "step_00000003"
    assert sorted(p.name for p in step_dir.glob("layer_*")) == [
        f"layer_{i:02d}-model_{t:02d}-model_states.pt" for i in range(4) for t in range(tp)]
    assert len(list(step_dir.glob("zero_pp_rank_0_mp_rank_*_optim_states.pt"))) == tp * pp
    api.consolidate(tmp_path / "out", tmp_path / "back", log=print)
    before, after = load_consolidated(tmp_path / "hub"), load_consolidated(tmp_path / "back")
    assert (after.source["tensor_parallel"], after.source["pipeline_parallel"]) == (tp, pp)
    for store in ("tensors", "padding"):
        a, b = getattr(before, store), getattr(after, store)
        assert sorted(a) == sorted(b)
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_pipeline_parallel_round_trip_is_exact(runs, tmp_path):
    _round_trip(runs, tmp_path, tp=1, pp=2)


def test_tensor_and_pipeline_parallel_round_trip_is_exact(runs, tmp_path):
    """TP=2 x PP=2: DeepSpeed's mp_rank numbering (stage x TP + tp rank) read back correctly."""
    _round_trip(runs, tmp_path, tp=2, pp=2)


def test_hugging_face_model_imported_into_a_tp2_training_checkpoint(runs, tmp_path):
    """HF LlamaForCausalLM -> a TP=2 training checkpoint at step 0 (to continue pretraining): transformers'
    logits equal the written checkpoint's, run in its own layout after CheckpointManager.load."""
    ckpt, _ = runs["llama"]
    api.export_hf(ckpt, tmp_path / "hf", verify_logits=False, log=print)
    checks = api.reshard(tmp_path / "hf", tmp_path / "tp2", tensor_parallel=2, base_config=ckpt.parent / "config.yaml",
                         log=print)
    from largelm.config import load_config

    model = load_config(ckpt.parent / "config.yaml").model
    assert checks[0].what.startswith("Hugging Face vs checkpoint (TP=2")
    assert checks[0].max_abs_diff <= logit_tol(model, checks[0].max_abs_logit)
    step_dir = tmp_path / "tp2" / "step_00000000"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["step"] == 0 and manifest["tensor_parallel"] == 2 and manifest["world_size"] == 2
    assert len(list(step_dir.glob("trainer_state_rank*.pt"))) == 2


def test_damaged_checkpoints_are_refused(runs, tmp_path):
    import shutil

    from largelm.convert import ConversionError

    ckpt, _ = runs["gpt"]
    step = tmp_path / "step_00000003"
    shutil.copytree(ckpt / "step_00000003", step)
    optim = next(step.glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    with pytest.raises(ConversionError, match="fails its sha256 check"):
        api.consolidate(step, tmp_path / "out", log=print)
    optim.unlink()
    with pytest.raises(ConversionError, match=f"{optim.name} listed in the manifest is missing"):
        api.consolidate(step, tmp_path / "out", checksums=False, log=print)
    (step / "manifest.json").unlink()
    with pytest.raises(ConversionError, match="no manifest.json: it is partial"):
        api.consolidate(step, tmp_path / "out", log=print)

"""BERT pipeline parallelism (largelm/model/bert_pipeline.py): parameter names map to BertModel's, a one-stage
pipeline computes exactly what BertModel computes, and PP=2 (and TP=2xPP=2) training runs through the real step
drivers (``BertPipelineStep`` vs ``BertStep``) match the single rank: fp32 loss, MLM/SOP metrics and gradient norm
after each of 3 steps within ``tolerances.sum_rtol`` of one step's reduction chain (the layouts differ in summation
order only; like tests/test_parallel_parity.py)."""

from __future__ import annotations

import time

import pytest
import torch
import yaml
from mp_utils import assert_steps_match, rel_diff, run_ranks, single_rank_parallel_state
from test_bert import TINY, VOCAB, bert_config, make_batch
from tolerances import chain_length, sum_rtol

STEPS, GRAD_ACCUM, MICRO = 3, 2, 4
MODEL = dict(TINY, num_layers=4, make_vocab_size_divisible_by=64)  # padded 256 at TP=1 and TP=2
# one optimizer step's reduction chain (the LM head adds a dense layer and a norm), forward and backward
STEP_CHAIN = chain_length(layers=4, hidden=64, ffn=256, seq=TINY["seq_length"], heads=4, vocab=256, extra=2 * 64,
                          tokens=MICRO * GRAD_ACCUM * TINY["seq_length"], backward=True)
LOSS_RTOL = NORM_RTOL = sum_rtol(STEP_CHAIN)  # summation order only
METRIC_ATOL = LOSS_RTOL  # metrics near 0 (accuracies) on the scale of 1
# name -> (ranks, tp, pp, model/bert options)
LAYOUTS = {
    "ref": (1, 1, 1, {}),
    "ref-untied-postln": (1, 1, 1, dict(tie_embeddings=False, residual_post_layernorm=True)),
    "pp2": (2, 1, 2, {}),
    "pp2-untied-postln": (2, 1, 2, dict(tie_embeddings=False, residual_post_layernorm=True)),
    "tp2xpp2": (4, 2, 2, {}),
    "tp2xpp2-sp": (4, 2, 2, dict(sequence_parallel=True)),
}


def _configs(opts: dict):
    from largelm.config import BertConfig, ModelConfig

    model = dict(MODEL, tie_embeddings=opts.get("tie_embeddings", True))
    return ModelConfig(**model), BertConfig(residual_post_layernorm=opts.get("residual_post_layernorm", False),
                                            binary_head=opts.get("binary_head", True))


def _full_weights(opts: dict, seed: int = 3) -> dict:
    from largelm.config import ParallelConfig
    from largelm.model.bert import build_bert_model
    from largelm.parallel.cpu_compat import model_parallel_manual_seed

    model_cfg, bert_cfg = _configs(opts)
    model_parallel_manual_seed(seed)
    model = build_bert_model(model_cfg, ParallelConfig(), bert_cfg, vocab_size=VOCAB)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from the init (zero biases, unit norms): every tensor matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


@pytest.mark.parametrize("opts", [{}, dict(tie_embeddings=False, residual_post_layernorm=True),
                                  dict(binary_head=False)], ids=["tied-preln", "untied-postln", "no-binary-head"])
def test_names_map_to_bertmodel_and_one_stage_equals_bertmodel(opts, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed's PipelineModule reads it
    from largelm.config import ParallelConfig
    from largelm.model.bert import bert_forward_metrics
    from largelm.model.bert_pipeline import bert_pipeline_layer_index, build_bert_pipeline, pipeline_name_to_bert
    from largelm.model.weights import load_full_state_dict

    L = MODEL["num_layers"]
    with single_rank_parallel_state():
        model, full = _full_weights(opts)
        model_cfg, bert_cfg = _configs(opts)
        pipe = build_bert_pipeline(model_cfg, ParallelConfig(), bert_cfg, vocab_size=VOCAB)
        names = [k for k in pipe.state_dict() if not k.endswith("_extra_state")]
        mapped = {pipeline_name_to_bert(k, L) for k in names}
        assert mapped == set(full), (sorted(mapped ^ set(full)))
        for name in full:  # bert_pipeline_layer_index is the inverse used for loading
            index, key = bert_pipeline_layer_index(name, L, model_cfg.tie_embeddings)
            prefix = "tied_modules.word_embeddings." if model_cfg.tie_embeddings and index == 0 else f"{index}."
            assert pipeline_name_to_bert(prefix + key, L) == name
        with pytest.raises(KeyError):
            pipeline_name_to_bert(f"{L + 1}.layer.mlp.linear_fc1.weight", L)
        with pytest.raises(KeyError):
            bert_pipeline_layer_index(f"encoder.layers.{L}.mlp.linear_fc1.weight", L, True)

        load_full_state_dict(pipe, full)
        for name, tensor in pipe.state_dict().items():
            if not name.endswith("_extra_state"):
                assert torch.equal(tensor, full[pipeline_name_to_bert(name, L)]), name
        batch = make_batch(b=3, seed=1)
        expected = bert_forward_metrics(model, batch)
        outputs = pipe((batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))
        got = pipe.loss_fn(outputs, (batch["mlm_labels"], batch["pair_label"]))
        assert set(pipe.loss_fn.records[0]) == set(expected) == set(pipe.metric_names)
        assert got.item() == expected["loss"].item()
        for k, v in pipe.loss_fn.records[0].items():
            assert v.item() == expected[k].item(), k


def _run_layouts(rank: int, world_size: int, names: list[str], weights: dict, batches: list) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from largelm.config import config_from_dict
    from largelm.parallel import groups
    from largelm.parallel.cpu_compat import model_parallel_manual_seed
    from largelm.train.step import build_step

    groups.init_distributed()
    out = {}
    try:
        for name in names:
            ranks, tp, pp, opts = LAYOUTS[name]
            model = dict(MODEL, tie_embeddings=opts.get("tie_embeddings", True))
            cfg = config_from_dict({
                "model": model, "tokenizer": {"model": "unused.model"}, "data": {"train": [{"path": "unused"}]},
                "bert": {"residual_post_layernorm": opts.get("residual_post_layernorm", False)},
                "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp, "zero_stage": 1,
                             "sequence_parallel": opts.get("sequence_parallel", False)},
                "optimizer": {"lr": 3e-3, "min_lr": 0.0, "warmup_steps": 0, "decay_style": "constant",
                              "weight_decay": 0.1, "grad_clip": 1.0},
                "train": {"steps": STEPS, "micro_batch_size": MICRO, "grad_accum_steps": GRAD_ACCUM,
                          "precision": "fp32", "seed": 5},
            }, source=name)
            groups.init_model_parallel(tp, pp)
            torch.manual_seed(5)
            model_parallel_manual_seed(5)
            start = time.perf_counter()
            step = build_step(cfg, world_size, init_state_dict=weights[opts.get("tie_embeddings", True)])
            type_name = f"{type(step).__name__}/{step.arch.name}"
            losses, norms, metrics = [], [], []
            for s in range(STEPS):
                loss = step.train_step(iter(batches[s * GRAD_ACCUM:(s + 1) * GRAD_ACCUM]))
                losses.append(float(loss))
                norms.append(float(step.engine.get_global_grad_norm()))
                metrics.append(dict(step.last_metrics))
            valid = float(step.eval_loss(batches[0]))
            out[name] = dict(losses=losses, norms=norms, metrics=metrics, valid=valid,
                             valid_metrics=dict(step.last_eval_metrics), step=type_name,
                             sp_params=sum(bool(getattr(p, "sequence_parallel", False))
                                           for p in step.engine.module.parameters()),
                             seconds=time.perf_counter() - start)
            del step
            dist.barrier()
            parallel_state.destroy_model_parallel()
    finally:
        groups.destroy()
    return out


def _compare(results: dict, name: str, ref_name: str) -> None:
    ref = results[ref_name][0]
    worst = {key: max(rel_diff(r[key][s], ref[key][s]) for r in results[name] for s in range(STEPS))
             for key in ("losses", "norms")}
    print(f"{name}: worst rel diff loss {worst['losses']:.1e} norm {worst['norms']:.1e}, "
          f"{max(r['seconds'] for r in results[name]):.1f}s")
    assert ref["step"] == "DenseStep/bert"
    assert ref["norms"][0] > 1.0  # clipping active: a wrong norm would change the next losses
    assert_steps_match(name, results[name], ref, STEPS, LOSS_RTOL, NORM_RTOL)
    for rank, res in enumerate(results[name]):
        assert res["step"] == "PipelineStep/bert"
        for s in range(STEPS):
            what = f"{name} rank {rank} step {s + 1}"
            assert set(res["metrics"][s]) == set(ref["metrics"][s]) == {
                "train/mlm_loss", "train/mlm_acc", "train/sop_loss", "train/sop_acc"}
            for k, v in ref["metrics"][s].items():
                assert res["metrics"][s][k] == pytest.approx(v, rel=LOSS_RTOL, abs=METRIC_ATOL), f"{what}: {k}"
        assert rel_diff(res["valid"], ref["valid"]) < LOSS_RTOL
        for k, v in ref["valid_metrics"].items():
            assert res["valid_metrics"][k] == pytest.approx(v, rel=LOSS_RTOL, abs=METRIC_ATOL), \
                f"{name} rank {rank}: {k}"


def _launch(worlds: dict[int, list[str]]) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    with single_rank_parallel_state():
        weights = {True: _full_weights({})[1], False: _full_weights(dict(tie_embeddings=False,
                                                                          residual_post_layernorm=True))[1]}
    batches = [make_batch(b=MICRO, seed=10 + i) for i in range(STEPS * GRAD_ACCUM)]
    with ThreadPoolExecutor(len(worlds)) as pool:
        futures = {w: pool.submit(run_ranks, _run_layouts, w, names, weights, batches, timeout_s=600)
                   for w, names in worlds.items()}
        per_world = {w: f.result() for w, f in futures.items()}
    return {name: [r[name] for r in per_world[w]] for w, names in worlds.items() for name in names}


@pytest.mark.slow
def test_pipeline_parallel_2_equals_single_rank():
    """PP=2, tied pre-LN and untied post-LN BERT: 3 fp32 steps equal the single-rank BertStep."""
    results = _launch({1: ["ref", "ref-untied-postln"], 2: ["pp2", "pp2-untied-postln"]})
    _compare(results, "pp2", "ref")
    _compare(results, "pp2-untied-postln", "ref-untied-postln")


@pytest.mark.slow
def test_tp2xpp2_equals_single_rank():
    """TP=2 x PP=2, also with sequence parallelism (sequence-split activations between stages)."""
    results = _launch({1: ["ref"], 4: ["tp2xpp2", "tp2xpp2-sp"]})
    _compare(results, "tp2xpp2", "ref")
    _compare(results, "tp2xpp2-sp", "ref")
    assert all(r["sp_params"] > 0 for r in results["tp2xpp2-sp"]) and results["tp2xpp2"][0]["sp_params"] == 0


def _pp2_config(tmp_path, tokenizer_path, shards, **train):
    config = bert_config(tmp_path, tokenizer_path, shards, steps=4, precision="fp32", grad_accum_steps=2,
                         micro_batch_size=4, **train)
    data = yaml.safe_load(config.read_text())
    data["parallel"] = {"pipeline_parallel": 2, "zero_stage": 1}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


@pytest.mark.slow
def test_pp2_bert_run_through_the_launcher_logs_bert_metrics(tmp_path, tokenizer_path, bert_shards):
    """The trainer with BERT PP=2 (ZeRO-1, fp32): trains, validates through ``eval_batch`` and logs the same
    MLM/SOP scalars as the dense BertStep."""
    from test_train_e2e import _tensorboard_scalars
    from train_utils import check_ok, launch, losses

    out = check_ok(launch(_pp2_config(tmp_path, tokenizer_path, bert_shards, eval_interval=2), nproc=2))
    assert sorted(losses(out)) == [1, 2, 3, 4], out[-3000:]
    assert "valid loss" in out and "mlm_acc" in out
    scalars = _tensorboard_scalars(tmp_path / "tb")
    for tag in ("train/mlm_loss", "train/mlm_acc", "train/sop_loss", "train/sop_acc", "valid/mlm_loss",
                "valid/mlm_acc", "valid/sop_loss", "valid/sop_acc"):
        assert tag in scalars, f"{tag} missing: {sorted(scalars)}"
    assert len(scalars["train/mlm_loss"]) == 4


@pytest.mark.slow
def test_pp2_bert_run_resumes_exactly(tmp_path, tokenizer_path, bert_shards):
    """2 + 2 steps with a restart from the PP=2 checkpoint (the output bias layer saved, the tied copy re-synced)
    log the uninterrupted run's losses."""
    from train_utils import check_ok, launch, losses

    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir(), run_dir.mkdir()
    reference = losses(check_ok(launch(_pp2_config(ref_dir, tokenizer_path, bert_shards, eval_interval=0), nproc=2)))
    config = _pp2_config(run_dir, tokenizer_path, bert_shards, eval_interval=0, exit_interval=2)
    first = losses(check_ok(launch(config, nproc=2)))
    files = {p.name for p in (run_dir / "ckpt" / "step_00000002").iterdir()}
    # L=2: layer 6 = output bias saved; layer 5 = the last stage's tied copy, not saved (re-synced from layer 0)
    assert "layer_06-model_00-model_states.pt" in files and not any(f.startswith("layer_05") for f in files), files
    out = check_ok(launch(config, nproc=2))
    assert "resumed from" in out
    assert sorted(reference) == [1, 2, 3, 4] and {**first, **losses(out)} == reference

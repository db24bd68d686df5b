"""Checkpoint conversion without training runs (one in-process gloo rank): layout rules against megatron's own
parameter attributes, the consolidated format, Hugging Face export/import against ``transformers`` and the plain
PyTorch reference (tests/reference_gpt.py), the tokenizer, and the errors.

Tolerances: two fp32 forwards of the same weights differ only in rounding: ``tolerances.logit_tol`` (the logits'
reduction chain, ~1.3e-5 x max |logit| for these models; measured megatron vs transformers ~5e-6 absolute with
large random weights, a wrong mapping O(1)).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from reference_gpt import RefConfig, ReferenceGPT, split_megatron_qkv
from tolerances import logit_tol, max_err

from largelm.checkpoint.consolidated import Consolidated, load_consolidated, save_consolidated
from largelm.config import ModelConfig, ParallelConfig
from largelm.convert import api, hf_tokenizer, verify
from largelm.errors import ConversionError, UnsupportedArchitecture, VerificationError
from largelm.model import layout
from largelm.model.hf.qkv import fuse_qkv, split_qkv

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 1000  # = the tokenizer fixture's vocabulary; padded by 64 -> 1024
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=VOCAB,
            make_vocab_size_divisible_by=64)
MODELS = {
    "gpt2": dict(style="gpt2", **TINY),
    "gpt2-untied": dict(style="gpt2", tie_embeddings=False, **TINY),
    "llama": dict(style="llama", num_query_groups=2, tie_embeddings=False, **TINY),  # GQA: 2 heads per group
    "llama-tied": dict(style="llama", ffn_hidden_size=96, rotary_base=500000.0, norm_epsilon=1e-6, **TINY),
}

def megatron_model(name: str, seed: int = 0):
    """A TP=1 megatron GPTModel of ``MODELS[name]`` with large random weights (so every tensor matters).
    Needs a process group (the ``rank`` fixture)."""
    from largelm.model.gpt import build_gpt_model
    from largelm.parallel.cpu_compat import model_parallel_manual_seed

    model_parallel_manual_seed(seed)
    model = build_gpt_model(ModelConfig(**MODELS[name]), ParallelConfig(), vocab_size=VOCAB).eval()
    return perturbed(model, seed)


def perturbed(model, seed: int = 0):
    """``model`` with N(0, 0.2) noise added to every parameter (norm gains too, so a misplaced tensor shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def consolidated_from(model, name: str, tokenizer=None) -> Consolidated:
    from largelm.checkpoint.consolidated import strip_vocab_padding

    cfg = ModelConfig(**MODELS[name])
    full = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    tensors, padding = strip_vocab_padding(full, VOCAB)
    return Consolidated(tensors, cfg, None, padding, 7, {"kind": "test"}, tokenizer)


def assert_same_safetensors(a, b, name: str = "model.safetensors") -> None:
    """``a/name`` and ``b/name`` hold the same tensor names with bit-identical values."""
    from safetensors.torch import load_file

    before, after = load_file(a / name), load_file(b / name)
    assert sorted(before) == sorted(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def import_randomized(model, tmp_path, norm_names: tuple) -> Consolidated:
    """Give a transformers model large random weights (norm gains around 1; logits far from uniform), save it to
    ``tmp_path/hf`` and import it (checked) into ``tmp_path/hub``; returns the consolidated result."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(1.0 if p.ndim == 1 and any(n in pname for n in norm_names) else 0.0, 0.2)
    model.save_pretrained(tmp_path / "hf")
    checks = api.import_hf(tmp_path / "hf", tmp_path / "hub", log=lambda *_: None)
    hub = load_consolidated(tmp_path / "hub")
    assert checks[0].max_abs_diff <= logit_tol(hub.model, checks[0].max_abs_logit) and checks[0].max_abs_logit > 3
    return hub


def reference_logits(c: Consolidated, tokens: torch.Tensor) -> torch.Tensor:
    padded = c.model.padded_vocab_size(1)
    ref = ReferenceGPT(RefConfig.from_model_config(c.model, padded))
    ref.load_from_megatron(c.padded_tensors(padded))
    with torch.no_grad():
        return ref(tokens)[..., :VOCAB]


@pytest.fixture(scope="module")
def rank():
    with verify.single_rank_group():
        yield


# --- layout rules ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_layout_rules_match_megatron_attributes(rank, name):
    from largelm.parallel.sharding import tp_layout

    model = megatron_model(name)
    cfg = ModelConfig(**MODELS[name])
    megatron = tp_layout(model)
    for pname, _ in model.named_parameters():
        assert layout.tp_partition(pname, layout.is_gated(cfg)) == megatron.get(pname), pname
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes == layout.gpt_param_shapes(cfg, vocab_rows=cfg.padded_vocab_size(1))
    assert list(shapes) == list(layout.gpt_param_shapes(cfg))  # same order as megatron's


@pytest.mark.parametrize("tied", [True, False])
def test_pipeline_names_invert_pipeline_layer_index(tied):
    from largelm.model.pipeline import pipeline_layer_index

    cfg = ModelConfig(**dict(MODELS["gpt2"], tie_embeddings=tied))
    for name in layout.gpt_param_shapes(cfg):
        index, key = pipeline_layer_index(name, cfg.num_layers, tied)
        pipe_name = (layout.TIED_PREFIX + key) if tied and index == 0 else f"{index}.{key}"
        assert layout.pipeline_name_to_gpt(pipe_name, cfg.num_layers) == name
    if tied:  # the last stage's copy of the tied embedding
        assert layout.pipeline_name_to_gpt(layout.TIED_PREFIX + "word_embeddings.weight", 2) == layout.WORD_EMBEDDINGS
    with pytest.raises(ConversionError, match="does not fit"):
        layout.pipeline_name_to_gpt("9.layer.mlp.linear_fc1.weight", 2)


def test_qkv_split_and_fuse_follow_megatrons_grouping():
    ref = RefConfig("llama", 8, 64, 1, 8, 2, 32, 16, 1e-5, 1e4, False)  # 8 query heads in 2 groups of 8 dims
    fused = torch.randn(ref.num_heads * 8 + 2 * 2 * 8, 64)
    q, k, v = split_qkv(fused, 8, 2, 8)
    for mine, theirs in zip((q, k, v), split_megatron_qkv(fused, ref)):
        assert torch.equal(mine, theirs)
    assert torch.equal(fuse_qkv(q, k, v, 8, 2, 8), fused)


def test_layouts_that_do_not_divide_are_refused():
    llama = ModelConfig(**MODELS["llama"])
    with pytest.raises(ConversionError, match="num_query_groups.*=2 is not divisible by tensor_parallel=4"):
        layout.check_tensor_parallel(llama, 4)
    with pytest.raises(ConversionError, match="ffn size=96 is not divisible by tensor_parallel=64"):
        layout.check_tensor_parallel(ModelConfig(**MODELS["llama-tied"]), 64)
    with pytest.raises(ConversionError, match="num_layers=2 is not divisible"):
        layout.check_pipeline_parallel(llama, 4)


# --- consolidated format --------------------------------------------------------------------------------------
def test_consolidated_round_trip_and_vocab_padding(rank, tmp_path, tokenizer_path):
    model = megatron_model("gpt2-untied")
    c = consolidated_from(model, "gpt2-untied", tokenizer_path)
    assert c.tensors[layout.WORD_EMBEDDINGS].shape == (VOCAB, 64)  # real rows only
    assert c.padding[layout.OUTPUT_LAYER].shape == (24, 64)  # 1024 - 1000 trained padding rows, kept
    save_consolidated(tmp_path / "hub", c)
    back = load_consolidated(tmp_path / "hub")
    assert back.tokenizer.read_bytes() == tokenizer_path.read_bytes() and back.step == 7
    for k in c.tensors:
        assert torch.equal(back.tensors[k], c.tensors[k]), k
    full = dict(model.state_dict())
    same = back.padded_tensors(1024)  # the source's padded size: bit-identical to the model
    assert all(torch.equal(same[k], full[k]) for k in same)
    more = back.padded_tensors(1280)  # more padding than recorded: zero rows appended
    assert torch.equal(more[layout.OUTPUT_LAYER][:1024], full[layout.OUTPUT_LAYER])
    assert not more[layout.OUTPUT_LAYER][1024:].any()
    fewer = back.padded_tensors(1008)  # less: cut (real rows are never touched)
    assert torch.equal(fewer[layout.OUTPUT_LAYER], full[layout.OUTPUT_LAYER][:1008])

    meta = json.loads((tmp_path / "hub" / "largelm.json").read_text())
    assert meta["format"] == "largelm-consolidated" and meta["vocab_padding_rows"] == {
        layout.WORD_EMBEDDINGS: 24, layout.OUTPUT_LAYER: 24}
    broken = dict(c.tensors)
    del broken["decoder.layers.1.mlp.linear_fc2.weight"]
    with pytest.raises(ConversionError, match=r"missing \[decoder.layers.1.mlp.linear_fc2.weight\]"):
        Consolidated(broken, c.model).validate()
    (tmp_path / "hub" / "model.safetensors").write_bytes(b"\0" * 100)  # truncated
    with pytest.raises(ConversionError, match="cannot be read"):
        load_consolidated(tmp_path / "hub")


def test_a_failed_save_leaves_no_metadata_vouching_for_other_weights(rank, tmp_path):
    save_consolidated(tmp_path / "hub", consolidated_from(megatron_model("gpt2"), "gpt2"))
    other = consolidated_from(megatron_model("gpt2", seed=1), "gpt2", tmp_path / "missing.model")
    with pytest.raises(ConversionError, match="missing.model does not exist"):  # fails after the new weights
        save_consolidated(tmp_path / "hub", other)
    with pytest.raises(ConversionError, match="no largelm.json"):  # the old metadata does not describe them
        load_consolidated(tmp_path / "hub")
    other.tokenizer = None
    save_consolidated(tmp_path / "hub", other)
    back = load_consolidated(tmp_path / "hub")
    assert all(torch.equal(back.tensors[k], v) for k, v in other.tensors.items())


# --- Hugging Face ---------------------------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("name", ["gpt2", "gpt2-untied", "llama", "llama-tied"])
def test_export_to_transformers_computes_the_same_logits(rank, tmp_path, tokenizer_path, name):
    """megatron (largelm) == transformers == the reference GPT, through the CLI's export (with its own check)."""
    from largelm.convert.hf import hf_logits

    model = megatron_model(name)
    c = consolidated_from(model, name, tokenizer_path)
    save_consolidated(tmp_path / "hub", c)
    lines = []
    checks = api.export_hf(tmp_path / "hub", tmp_path / "hf", log=lines.append)
    assert checks[0].ok and checks[0].max_abs_logit > 3  # not near-uniform
    assert checks[0].max_abs_diff <= logit_tol(c.model, checks[0].max_abs_logit)

    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    arch = "LlamaForCausalLM" if name.startswith("llama") else "GPT2LMHeadModel"
    assert cfg["architectures"] == [arch] and cfg["vocab_size"] == VOCAB
    assert cfg["tie_word_embeddings"] == ModelConfig(**MODELS[name]).tie_embeddings
    if name == "llama":
        assert cfg["num_key_value_heads"] == 2
    if name == "llama-tied":
        assert cfg["rope_parameters"]["rope_theta"] == 500000.0 and cfg["rms_norm_eps"] == 1e-6
    tokens = verify.fixed_tokens(c.model)
    theirs = hf_logits(tmp_path / "hf", tokens)
    input_ids, position_ids = tokens, torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        ours = model(input_ids, position_ids, None)[..., :VOCAB]
    tol = logit_tol(c.model, ours.abs().max().item())
    assert theirs.shape == ours.shape and max_err(theirs, ours) <= tol
    assert max_err(theirs, reference_logits(c, tokens)) <= tol


def test_export_verification_fails_on_a_wrong_mapping(rank, tmp_path, monkeypatch):
    """The self-check is real: a QKV layout mistake in the exporter is caught."""
    from largelm.model.hf import gpt2 as hf_gpt2

    c = consolidated_from(megatron_model("gpt2"), "gpt2")
    save_consolidated(tmp_path / "hub", c)
    original = hf_gpt2.to_hf

    def wrong(model, tensors):  # pretend megatron's per-head QKV were one [Q; K; V] block
        out = original(model, tensors)
        for i in range(model.num_layers):
            p = f"decoder.layers.{i}.self_attention.linear_qkv."
            out[f"transformer.h.{i}.attn.c_attn.weight"] = tensors[p + "weight"].t().contiguous()
        return out

    monkeypatch.setattr(hf_gpt2, "to_hf", wrong)
    with pytest.raises(VerificationError, match="max \\|logit diff\\|"):
        api.export_hf(tmp_path / "hub", tmp_path / "hf", log=lambda *_: None)
    assert json.loads((tmp_path / "hf" / "largelm_conversion.json").read_text())["ok"] is False


def test_a_failed_verification_exits_3_and_marks_the_result_unusable(rank, tmp_path, monkeypatch, capsys):
    from largelm.convert.cli import main

    save_consolidated(tmp_path / "hub", consolidated_from(megatron_model("gpt2"), "gpt2"))
    real, calls = verify.consolidated_logits, []

    def result_off_by_one(c, tokens):  # the source's logits are right, the written result's are not
        calls.append(c)
        return real(c, tokens) + (len(calls) == 2)

    monkeypatch.setattr(verify, "consolidated_logits", result_off_by_one)
    assert main(["consolidate", str(tmp_path / "hub"), str(tmp_path / "copy")]) == 3
    assert "max |logit diff| 1.000e+00" in capsys.readouterr().err
    assert json.loads((tmp_path / "copy" / "largelm.json").read_text())["verification"][0]["ok"] is False
    with pytest.raises(ConversionError, match="failed its verification"):
        load_consolidated(tmp_path / "copy")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_to_largelm_to_hf_is_identical(rank, tmp_path, kind):
    """A model written by transformers itself -> largelm consolidated -> Hugging Face: the same tensors."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                         activation_function="gelu", tie_word_embeddings=True)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    c = import_randomized(model, tmp_path, norm_names=("ln", "norm"))
    assert c.model.style == kind and c.model.vocab_size == VOCAB
    api.export_hf(tmp_path / "hub", tmp_path / "hf2", log=lambda *_: None)
    assert_same_safetensors(tmp_path / "hf", tmp_path / "hf2")
    a, b = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "hf", tmp_path / "hf2"))
    for key in ("vocab_size", "tie_word_embeddings", "num_key_value_heads", "n_inner", "rms_norm_eps",
                "layer_norm_epsilon", "rope_parameters", "max_position_embeddings", "n_positions"):
        assert a.get(key) == b.get(key), key


def test_tokenizer_export_encodes_like_largelm(tmp_path, tokenizer_path, small_corpus):
    from transformers import AutoTokenizer

    from largelm.tokenizer import Tokenizer

    docs = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()[:10]]
    record = hf_tokenizer.export_tokenizer(tokenizer_path, tmp_path, extra_texts=tuple(docs))
    assert record["texts_checked"] == len(hf_tokenizer.CHECK_TEXTS) + len(docs)
    hf = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    ours = Tokenizer.load(tokenizer_path)
    for text in ("To be, or not to be, that is the question:\n  Whether 'tis nobler in the mind", *docs):
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
        assert hf.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (ours.eos_id, ours.pad_id, ours.bos_id)


# --- errors -----------------------------------------------------------------------------------------------------
def test_unrepresentable_architectures_are_refused(rank, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gqa_gpt2 = ModelConfig(**dict(MODELS["gpt2"], num_query_groups=2))
    with pytest.raises(UnsupportedArchitecture, match="cannot represent grouped-query attention"):
        from largelm.model.hf import gpt2 as hf_gpt2

        hf_gpt2.check_exportable(gqa_gpt2)
    from transformers import RobertaConfig

    RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64).save_pretrained(tmp_path / "roberta")
    with pytest.raises(UnsupportedArchitecture, match="model_type 'roberta' has no largelm equivalent"):
        api.import_hf(tmp_path / "roberta", tmp_path / "out", log=lambda *_: None)
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "openai-gelu")  # GPT2Config's default activation is OpenAI's tanh approximation
    with pytest.raises(UnsupportedArchitecture, match="gelu_new"):
        api.import_hf(tmp_path / "openai-gelu", tmp_path / "out", log=lambda *_: None)


def test_missing_partial_and_unsafe_checkpoints_are_refused(tmp_path):
    from largelm.checkpoint.reader import load_pt

    with pytest.raises(ConversionError, match="does not exist"):
        api.consolidate(tmp_path / "nowhere", tmp_path / "out", log=lambda *_: None)
    partial = tmp_path / "ckpt" / "step_00000004"
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ConversionError, match="no manifest.json: it is partial"):
        api.consolidate(partial, tmp_path / "out", log=lambda *_: None)
    interrupted = tmp_path / "ckpt" / ".partial-step_00000008"
    interrupted.mkdir()
    with pytest.raises(ConversionError, match="partial checkpoint"):
        api.consolidate(interrupted, tmp_path / "out", log=lambda *_: None)
    with pytest.raises(ConversionError, match="neither a largelm checkpoint"):
        api.consolidate(tmp_path, tmp_path / "out", log=lambda *_: None)
    evil = tmp_path / "evil.pt"
    torch.save({"module": {}, "payload": ConversionError("not a tensor")}, evil)
    with pytest.raises(ConversionError, match="refusing to unpickle"):
        load_pt(evil)


def test_reshard_requires_drop_optimizer_and_a_training_config(rank, tmp_path):
    c = consolidated_from(megatron_model("llama"), "llama")
    save_consolidated(tmp_path / "hub", c)
    with pytest.raises(ConversionError, match="carries no training config.*--config"):
        api.reshard(tmp_path / "hub", tmp_path / "out", tensor_parallel=2, log=lambda *_: None)


def test_target_layout_is_validated_before_any_rank_starts(rank, tmp_path, tokenizer_path, shard_dir,
                                                           shard_seq_length):
    from train_utils import tiny_config

    from largelm.config import load_config
    from largelm.convert.reshard import target_config

    cfg = load_config(tiny_config(tmp_path, tokenizer_path, shard_dir, shard_seq_length,
                                  model={"style": "llama", "num_query_groups": 2, "tie_embeddings": False,
                                         "vocab_size": VOCAB}))
    c = consolidated_from(megatron_model("llama"), "llama")
    c.config = cfg
    out = tmp_path / "out"
    good = target_config(c, tensor_parallel=2, pipeline_parallel=2, zero_stage=1, out_root=out,
                         overrides=("train.steps=20",))
    assert (good.parallel.tensor_parallel, good.parallel.pipeline_parallel, good.parallel.zero_stage) == (2, 2, 1)
    assert good.checkpoint.dir == str(out) and good.train.steps == 20 and good.model.kv_groups == 2
    for kwargs, message in [
        (dict(tensor_parallel=4), "num_query_groups=2 is not divisible by parallel.tensor_parallel=4"),
        (dict(tensor_parallel=1, pipeline_parallel=4, zero_stage=1), "num_layers=2 is not divisible"),
        (dict(tensor_parallel=1, pipeline_parallel=2), "supports only ZeRO stage 0 or 1"),
        (dict(tensor_parallel=1, overrides=("model.num_layers=4",)), "does not fit the converted weights"),
    ]:
        with pytest.raises(ConversionError, match=message):
            target_config(c, out_root=out, **{"pipeline_parallel": 1, **kwargs})
    save_consolidated(tmp_path / "hub", c)  # the command fails the same way, before spawning anything
    with pytest.raises(ConversionError, match="not divisible by parallel.tensor_parallel=4"):
        api.reshard(tmp_path / "hub", out, tensor_parallel=4, log=lambda *_: None)
    assert not out.exists()


def test_tool_script_and_module_entry_points(tmp_path, rank):
    import subprocess
    import sys

    from train_utils import REPO

    help_text = subprocess.run([sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "largelm-convert" in help_text and "reshard" in help_text
    save_consolidated(tmp_path / "hub", consolidated_from(megatron_model("gpt2"), "gpt2"))
    info = subprocess.run([sys.executable, "-m", "largelm.convert", "info", str(tmp_path / "hub")],
                          capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert json.loads(info)["kind"] == "consolidated"


def test_cli_help_and_exit_codes(tmp_path, capsys):
    from largelm.convert.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("consolidate", "reshard", "export-hf", "import-hf", "info"):
        assert command in out
    assert main(["consolidate", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err

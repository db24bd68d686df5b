"""BERT conversion without training runs (one in-process gloo rank): the parameter layout against megatron's
BertModel, export to transformers (BertForPreTraining/BertForMaskedLM for post-LN, MegatronBert* for pre-LN) with
equal MLM and binary-head logits, transformers -> largelm -> transformers identity, the BERT tokenizer export, and a
mapping mistake being caught by the self-check. Tolerance: ``tolerances.logit_tol`` (two fp32 forwards of the same
weights: the logits' reduction chain relative to max |logit|; a mapping mistake is O(1)).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_convert import assert_same_safetensors, import_randomized, perturbed
from tolerances import logit_tol, max_err

from largelm.checkpoint.consolidated import Consolidated, load_consolidated, save_consolidated, strip_vocab_padding
from largelm.config import BertConfig, ModelConfig, ParallelConfig
from largelm.convert import api, verify
from largelm.errors import UnsupportedArchitecture, VerificationError
from largelm.model import layout
from largelm.model.hf import bert as hf_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 1000  # = the tokenizer fixture's vocabulary; padded by 64 -> 1024
VARIANTS = {  # name: (model fields, bert fields)
    "post": (dict(), dict(residual_post_layernorm=True)),
    "post-mlm-untied": (dict(tie_embeddings=False), dict(residual_post_layernorm=True, binary_head=False)),
    "pre": (dict(), dict(residual_post_layernorm=False)),
    "pre-mlm": (dict(), dict(residual_post_layernorm=False, binary_head=False)),
}


def configs(name: str) -> tuple[ModelConfig, BertConfig]:
    model, bert = VARIANTS[name]
    return (ModelConfig(arch="bert", style="gpt2", num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32,
                        vocab_size=VOCAB, make_vocab_size_divisible_by=64, **model), BertConfig(**bert))


def bert_model(name: str, seed: int = 0):
    """A TP=1 megatron BertModel with large random weights (norm gains too, so a misplaced norm shows)."""
    from largelm.model.bert import build_bert_model
    from largelm.parallel.cpu_compat import model_parallel_manual_seed

    model_cfg, bert = configs(name)
    model_parallel_manual_seed(seed)
    return perturbed(build_bert_model(model_cfg, ParallelConfig(), bert, vocab_size=VOCAB).eval(), seed)


def consolidated_from(model, name: str, tokenizer=None) -> Consolidated:
    model_cfg, bert = configs(name)
    full = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    tensors, padding = strip_vocab_padding(full, VOCAB)
    return Consolidated(tensors, model_cfg, None, padding, 3, {"kind": "test"}, tokenizer, bert=bert)


@pytest.fixture(scope="module")
def rank():
    with verify.single_rank_group():
        yield


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_bert_layout_matches_megatron(rank, name):
    """Names, shapes and order of every BertModel parameter, and the TP rules against megatron's attributes."""
    from largelm.parallel.sharding import tp_layout

    model = bert_model(name)
    model_cfg, bert = configs(name)
    real = {k: tuple(v.shape) for k, v in model.named_parameters()}
    assert list(real.items()) == list(layout.param_shapes(model_cfg, bert, vocab_rows=1024).items())
    megatron = tp_layout(model)
    for pname in real:
        assert layout.tp_partition(pname, False) == megatron.get(pname), pname


@pytest.mark.numerics
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_bert_export_to_transformers_computes_the_same_logits(rank, tmp_path, tokenizer_path, name):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from largelm.convert.hf import hf_logits

    model = bert_model(name)
    c = consolidated_from(model, name, tokenizer_path)
    save_consolidated(tmp_path / "hub", c)
    checks = api.export_hf(tmp_path / "hub", tmp_path / "hf", log=lambda *_: None)
    assert checks[0].ok and checks[0].max_abs_logit > 3
    assert checks[0].max_abs_diff <= logit_tol(c.model, checks[0].max_abs_logit)

    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == [hf_bert.architecture(c.bert)]
    assert cfg["model_type"] == ("bert" if c.bert.residual_post_layernorm else "megatron-bert")
    tokens = verify.fixed_tokens(c.model)
    types, mask = verify.bert_inputs(tokens)
    with torch.no_grad():
        ours, binary = model(tokens, mask, tokentype_ids=types)
    ours = verify.drop_padded(ours, mask)
    theirs, their_binary = hf_logits(tmp_path / "hf", tokens)
    tol = logit_tol(c.model, ours.abs().max().item())
    assert theirs.shape == ours[..., :VOCAB].shape and max_err(theirs, ours[..., :VOCAB]) <= tol
    if c.bert.binary_head:
        assert max_err(their_binary, binary) <= logit_tol(c.model, binary.abs().max().item())
    # what a user does: AutoModelForMaskedLM (it drops the binary head of a PreTraining export) + AutoTokenizer
    mlm = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = verify.drop_padded(mlm(input_ids=tokens, token_type_ids=types, attention_mask=mask).logits, mask)
    assert max_err(logits, ours[..., :VOCAB]) <= tol
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    pair = tok("To be", "or not")
    assert pair["input_ids"][0] == tok.cls_token_id and pair["input_ids"][-1] == tok.sep_token_id
    assert tok.convert_ids_to_tokens([tok.mask_token_id]) == ["[MASK]"]


def test_bert_norm_placement_mistake_is_caught(rank, tmp_path, monkeypatch):
    """The self-check is real: exporting post-LN norms without the one-slot shift is caught."""
    c = consolidated_from(bert_model("post"), "post")
    save_consolidated(tmp_path / "hub", c)
    original = hf_bert._pairs

    def unshifted(model, bert):
        pairs = original(model, bert)
        return [(o, t.replace(f"layer.{i - 1}.output.LayerNorm", f"layer.{i}.output.LayerNorm")
                 if o.startswith(f"encoder.layers.{i}.input_norm") else t)
                for o, t in pairs for i in [int(o.split(".")[2]) if o.startswith("encoder.layers.") else 0]]

    monkeypatch.setattr(hf_bert, "_pairs", unshifted)
    with pytest.raises((VerificationError, KeyError, UnsupportedArchitecture)):
        api.export_hf(tmp_path / "hub", tmp_path / "hf", log=lambda *_: None)


@pytest.mark.parametrize("kind", ["bert", "megatron-bert"])
def test_hf_bert_to_largelm_to_hf_is_identical(rank, tmp_path, kind):
    """A BERT written by transformers itself -> largelm consolidated -> transformers: the same tensors."""
    from transformers import BertConfig as HFBert
    from transformers import BertForPreTraining, MegatronBertConfig, MegatronBertForPreTraining

    torch.manual_seed(0)
    fields = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=160, max_position_embeddings=48, hidden_act="gelu")
    model = (BertForPreTraining(HFBert(**fields)) if kind == "bert"
             else MegatronBertForPreTraining(MegatronBertConfig(**fields)))
    c = import_randomized(model, tmp_path, norm_names=("LayerNorm", ".ln"))
    assert c.model.arch == "bert" and c.bert.binary_head and c.bert.residual_post_layernorm == (kind == "bert")
    api.export_hf(tmp_path / "hub", tmp_path / "hf2", log=lambda *_: None)
    assert_same_safetensors(tmp_path / "hf", tmp_path / "hf2")


def test_unrepresentable_bert_is_refused(rank, tmp_path):
    from transformers import BertConfig as HFBert
    from transformers import BertModel

    BertModel(HFBert(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64)).save_pretrained(tmp_path / "encoder-only")
    with pytest.raises(UnsupportedArchitecture, match="no MLM head"):
        api.import_hf(tmp_path / "encoder-only", tmp_path / "hub", log=lambda *_: None)
    from transformers import BertForMaskedLM

    BertForMaskedLM(HFBert(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, hidden_act="relu")).save_pretrained(tmp_path / "relu")
    with pytest.raises(UnsupportedArchitecture, match="hidden_act='relu'"):
        api.import_hf(tmp_path / "relu", tmp_path / "hub2", log=lambda *_: None)


# --- a checkpoint written by a real BERT training run -------------------------------------------------------------
LAYOUTS = {  # trained layout: (parallel section, bert section, model overrides)
    "tp2-post": ({"tensor_parallel": 2, "zero_stage": 1}, {"residual_post_layernorm": True}, {}),
    "pp2-pre-untied": ({"pipeline_parallel": 2, "zero_stage": 1}, {}, {"tie_embeddings": False}),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_bert_checkpoint_consolidates_reshards_and_exports(tmp_path, tokenizer_path, bert_shards, layout_name):
    """BERT trained 2 steps at TP=2 (post-LN) or PP=2 (pre-LN, untied; DeepSpeed's pipeline engine) with ZeRO-1 and
    the deepspeed launcher -> consolidated (checked against the checkpoint's own TP/PP forward) -> Hugging Face
    (checked against transformers) and -> TP=1 and PP=2 / TP=2 training checkpoints (checked through the trainer's
    resume path) whose consolidations are the same tensors."""
    from train_utils import check_ok, launch, tiny_config

    parallel, bert, model = LAYOUTS[layout_name]
    config = tiny_config(tmp_path, tokenizer_path, bert_shards, 64,
                         model={"arch": "bert", "style": "gpt2", "num_layers": 2, "hidden_size": 64,
                                "num_attention_heads": 4, "seq_length": 64, "make_vocab_size_divisible_by": 64,
                                **model},
                         bert={"objective": "sop", **bert}, parallel=parallel,
                         train={"steps": 2, "micro_batch_size": 4, "grad_accum_steps": 2},
                         checkpoint={"dir": str(tmp_path / "ckpt"), "save_interval": 2, "keep_last": 1},
                         logging={"tensorboard_dir": None, "progress_bar": False, "peak_tflops_per_rank": 1.0})
    check_ok(launch(config, nproc=2))
    quiet = dict(log=lambda *_: None)
    [check] = api.consolidate(tmp_path / "ckpt", tmp_path / "hub", **quiet)
    hub = load_consolidated(tmp_path / "hub")
    # the checkpoint's own TP=2 / PP=2 forward vs the consolidated model's: fp32 rounding only
    assert check.ok and check.max_abs_diff <= logit_tol(hub.model, check.max_abs_logit) and "=2" in check.what
    assert hub.model.arch == "bert" and hub.step == 2
    assert hub.bert.residual_post_layernorm == bool(bert.get("residual_post_layernorm"))
    [check] = api.export_hf(tmp_path / "hub", tmp_path / "hf", **quiet)
    assert check.ok and "ForPreTraining" in check.what
    # TP=2 -> PP=2 and PP=2 -> TP=2 (DeepSpeed's pipeline engine writes/reads the other one), TP=1 for either
    other = {"tensor_parallel": 1, "pipeline_parallel": 2} if "tp2" in layout_name else {"tensor_parallel": 2}
    for name, target in (("one", {"tensor_parallel": 1}), ("other", other)):
        [check] = api.reshard(tmp_path / "ckpt", tmp_path / name, drop_optimizer=True, **target, **quiet)
        assert check.ok and check.max_abs_diff <= logit_tol(hub.model, check.max_abs_logit), name
        api.consolidate(tmp_path / name, tmp_path / f"hub-{name}", **quiet)
        assert_same_safetensors(tmp_path / "hub", tmp_path / f"hub-{name}")

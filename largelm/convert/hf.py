"""Hugging Face ``transformers`` directories <-> the consolidated hub.

Export writes ``config.json`` (the ``transformers`` config class's own serialisation), ``model.safetensors``
(sharded with an index above ``max_shard_size``), ``generation_config.json`` and the tokenizer files
(hf_tokenizer.py), so ``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``
load it with no network access. The model class follows the largelm style: gpt2 -> ``GPT2LMHeadModel``,
llama -> ``LlamaForCausalLM``; ``model.arch: bert`` -> ``BertForPreTraining``/``BertForMaskedLM`` (post-LN) or
``MegatronBertForPreTraining``/``MegatronBertForMaskedLM`` (pre-LN), see hf_bert.py; BERT directories load with
``AutoModelForMaskedLM`` and their tokenizer adds ``[CLS] A [SEP] B [SEP]``.

Import reads ``config.json`` through ``transformers.AutoConfig`` (so legacy spellings are normalised the way
transformers itself reads them) and the weights from safetensors (or ``pytorch_model*.bin`` with
``torch.load(weights_only=True)``); nothing is unpickled beyond tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from largelm.checkpoint.consolidated import Consolidated, dtype_name
from largelm.config import Config, ConfigError, ModelConfig, config_from_dict
from largelm.convert import hf_bert, hf_gpt2, hf_llama
from largelm.convert.hf_tokenizer import export_tokenizer, special_ids
from largelm.convert.verify import bert_inputs, drop_padded
from largelm.errors import ConversionError, UnsupportedArchitecture
from largelm.tokenizer import Tokenizer

DEFAULT_MAX_SHARD = 5 * 1024**3
DEFAULT_SEQ_LENGTH = 2048  # largelm seq_length for imports without a training config (Llama has no position table)


def offline() -> None:
    """Never reach for the Hugging Face Hub (every path here is a local directory); check transformers is new
    enough (the v5 config/loading API: ``rope_parameters``, ``from_pretrained(dtype=...)``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ConversionError("Hugging Face conversion needs the transformers package (pip install 'transformers>=5')") \
            from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ConversionError(f"Hugging Face conversion needs transformers>=5, found {transformers.__version__}")


def architecture_of(c: Consolidated) -> str:
    """The transformers class an export of ``c`` is written as."""
    if c.model.arch == "bert":
        return hf_bert.architecture(c.bert)
    return mapping_for(c.model).ARCHITECTURE


def mapping_for(model: ModelConfig):
    if model.arch == "bert":
        return hf_bert
    return hf_llama if model.style == "llama" else hf_gpt2


# --- export --------------------------------------------------------------------------------------------------
def export_hf(c: Consolidated, out_dir: Path, *, dtype: Optional[torch.dtype] = None,
              tokenizer: Optional[Path] = None, max_shard_size: int = DEFAULT_MAX_SHARD, log=print) -> dict:
    """Write ``c`` as a Hugging Face model directory. Returns {"tokenizer": check record or None}."""
    offline()
    from transformers import AutoConfig, GenerationConfig

    mapping = mapping_for(c.model)
    mapping.check_exportable(c.model)
    dtype = dtype or c.dtype
    tokenizer = Path(tokenizer) if tokenizer else c.tokenizer
    ids = {}
    if tokenizer is not None:
        ids = special_ids(tokenizer)
    bert = (c.bert,) if c.model.arch == "bert" else ()
    tensors = {k: v.to(dtype) for k, v in mapping.to_hf(c.model, c.tensors, *bert).items()}
    fields = mapping.hf_config(c.model, ids, dtype_name(dtype), *bert)
    config = AutoConfig.for_model(**fields)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    if not bert:  # an encoder has no generation settings
        GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    save_hf_weights(tensors, out_dir, max_shard_size)
    record = None
    if tokenizer is not None:
        record = export_tokenizer(tokenizer, out_dir, bert=bool(bert))
        log(f"tokenizer: {tokenizer} -> {out_dir}/tokenizer.json ({record['tokenizer_class']}, "
            f"{record['texts_checked']} texts encode identically)")
    else:
        log("warning: no tokenizer known (pass --tokenizer): the export has no tokenizer files")
    return {"tokenizer": record}


def save_hf_weights(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int = DEFAULT_MAX_SHARD) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].contiguous() for n in names}, str(out_dir / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --- import --------------------------------------------------------------------------------------------------
def read_hf_config(path: Path):
    offline()
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises ValueError/OSError/KeyError for unknown or broken configs
        raise ConversionError(f"{path}/config.json cannot be read by transformers: {err}") from None


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory (safetensors preferred; .bin via weights_only)."""
    from safetensors import safe_open

    path = Path(path)
    files: list[Path]
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = [path / f for f in sorted(set(index["weight_map"].values()))]
    elif (path / "pytorch_model.bin").is_file():
        files = [path / "pytorch_model.bin"]
    elif (path / "pytorch_model.bin.index.json").is_file():
        index = json.loads((path / "pytorch_model.bin.index.json").read_text())
        files = [path / f for f in sorted(set(index["weight_map"].values()))]
    else:
        raise ConversionError(f"{path} has no model weights (model.safetensors[.index.json] or pytorch_model.bin)")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConversionError(f"Hugging Face model {path} is incomplete: missing weight files {missing}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as fh:
                    for key in fh.keys():
                        tensors[key] = fh.get_tensor(key)
            except Exception as err:
                raise ConversionError(f"{f} cannot be read (truncated or corrupt?): {err}") from None
        else:
            try:
                tensors.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as err:
                raise ConversionError(f"{f} cannot be loaded with weights_only=True: {err}") from None
    return tensors


def import_hf(path: Path, base_config: Optional[Config] = None, log=print) -> Consolidated:
    """A Hugging Face directory -> Consolidated. With ``base_config`` the result carries a whole training config
    (its model section replaced by the imported shape, keeping ``seq_length`` and ``make_vocab_size_divisible_by``)."""
    path = Path(path)
    hf_cfg = read_hf_config(path)
    model_type = getattr(hf_cfg, "model_type", None)
    mapping = {"gpt2": hf_gpt2, "llama": hf_llama, "bert": hf_bert, "megatron-bert": hf_bert}.get(model_type)
    if mapping is None:
        raise UnsupportedArchitecture(f"{path}: model_type {model_type!r} has no largelm equivalent (supported: "
                                      "gpt2 -> style gpt2, llama -> style llama, bert / megatron-bert -> arch bert)")
    fields = mapping.model_fields(hf_cfg)
    positions = fields["max_position_embeddings"]
    base_model = base_config.model if base_config is not None else None
    seq = base_model.seq_length if base_model else min(positions, DEFAULT_SEQ_LENGTH)
    if seq > positions:
        raise ConversionError(f"the training config's model.seq_length={seq} exceeds the imported model's "
                              f"max_position_embeddings={positions}")
    fields.setdefault("arch", "gpt")
    fields.update(seq_length=seq,
                  make_vocab_size_divisible_by=base_model.make_vocab_size_divisible_by if base_model else 128)
    try:
        model = ModelConfig(**fields)
    except ValueError as err:
        raise UnsupportedArchitecture(f"{path}: the imported shape is not a valid largelm model: {err}") from None
    hf = read_hf_weights(path)
    dtypes = {t.dtype for t in hf.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise ConversionError(f"{path}: tensors of mixed dtypes {sorted(map(str, dtypes))}")
    bert = mapping.bert_fields(hf_cfg, hf) if model.arch == "bert" else None
    tensors = mapping.from_hf(model, hf, bert) if bert is not None else mapping.from_hf(model, hf)
    tokenizer = path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None
    config = None
    if base_config is not None:
        data = base_config.model_dump(mode="json")
        data["model"] = model.model_dump(mode="json")
        if bert is not None:
            data["bert"] = {**(data.get("bert") or {}), "binary_head": bert.binary_head,
                            "residual_post_layernorm": bert.residual_post_layernorm}
        if tokenizer is not None:
            data["tokenizer"]["model"] = str(tokenizer.resolve())
        try:
            config = config_from_dict(data, source=f"{path} + training config")
        except ConfigError as err:
            raise ConversionError(str(err)) from None
        if tokenizer is None and Path(config.tokenizer.model).is_file():
            tokenizer = Path(config.tokenizer.model)
    if tokenizer is not None:
        vocab = Tokenizer.load(tokenizer).vocab_size
        if vocab > model.vocab_size:
            raise ConversionError(f"tokenizer {tokenizer} has {vocab} pieces, more than the model's vocab_size "
                                  f"{model.vocab_size}")
    else:
        log(f"note: {path} has no sentencepiece tokenizer.model; largelm training needs one (tokenizer.model in "
            "the training config)")
    c = Consolidated(tensors, model, config, {}, 0, {"kind": "huggingface", "path": str(path),
                                                     "model_type": model_type}, tokenizer, bert=bert)
    c.validate()
    return c


# --- forward -------------------------------------------------------------------------------------------------
@torch.no_grad()
def hf_logits(path: Path, tokens: torch.Tensor):
    """Logits of a Hugging Face directory, loaded by ``transformers`` exactly as a user would, in fp32. BERT
    directories give (MLM logits, binary-head logits or None) on ``verify.bert_inputs(tokens)``."""
    offline()
    import transformers

    cfg = read_hf_config(path)
    bert = getattr(cfg, "model_type", None) in ("bert", "megatron-bert")
    pretraining = bert and any(a.endswith("ForPreTraining") for a in cfg.architectures or [])
    auto = (transformers.AutoModelForPreTraining if pretraining else transformers.AutoModelForMaskedLM) if bert \
        else transformers.AutoModelForCausalLM
    try:
        model = auto.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    except Exception as err:
        raise ConversionError(f"transformers cannot load {path}: {err}") from None
    model.eval()
    if not bert:
        return model(input_ids=tokens.long()).logits.float()

    types, mask = bert_inputs(tokens)
    out = model(input_ids=tokens.long(), token_type_ids=types, attention_mask=mask)
    if pretraining:
        return drop_padded(out.prediction_logits.float(), mask), out.seq_relationship_logits.float()
    return drop_padded(out.logits.float(), mask), None

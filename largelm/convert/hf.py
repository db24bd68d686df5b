"""Hugging Face ``transformers`` directories <-> the consolidated hub.

Export writes ``config.json`` (the ``transformers`` config class's own serialisation), ``model.safetensors``
(sharded with an index above ``max_shard_size``), ``generation_config.json`` and the tokenizer files
(hf_tokenizer.py), so ``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``
load it with no network access. The model class follows the largelm style: gpt2 -> ``GPT2LMHeadModel``,
llama -> ``LlamaForCausalLM``; ``model.arch: moe`` -> ``MixtralForCausalLM`` (largelm/model/hf/mixtral.py);
``model.arch: bert`` -> ``BertForPreTraining``/``BertForMaskedLM`` (post-LN) or
``MegatronBertForPreTraining``/``MegatronBertForMaskedLM`` (pre-LN), see largelm/model/hf/bert.py; BERT directories
load with ``AutoModelForMaskedLM`` and their tokenizer adds ``[CLS] A [SEP] B [SEP]``.

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
from largelm.convert.hf_tokenizer import export_tokenizer, special_ids
from largelm.errors import ConversionError, UnsupportedArchitecture
from largelm.fileio import confined_path, save_safetensors
from largelm.model.registry import arch_for_hf_model_type, get_arch
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
        raise ConversionError("Hugging Face conversion needs the transformers package "
                              "(pip install 'transformers>=5')") from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ConversionError(f"Hugging Face conversion needs transformers>=5, found {transformers.__version__}")


def architecture_of(c: Consolidated) -> str:
    """The transformers class an export of ``c`` is written as."""
    arch = get_arch(c.model.arch)
    return arch.hf_export(c.model).architecture(*arch.section_args(c))


def mapping_for(model: ModelConfig):
    """The Hugging Face adapter (largelm/model/hf/) an export of ``model`` uses: its architecture's choice."""
    return get_arch(model.arch).hf_export(model)


# --- export --------------------------------------------------------------------------------------------------
def export_hf(c: Consolidated, out_dir: Path, *, dtype: Optional[torch.dtype] = None,
              tokenizer: Optional[Path] = None, max_shard_size: int = DEFAULT_MAX_SHARD, log=print) -> dict:
    """Write ``c`` as a Hugging Face model directory. Returns {"tokenizer": check record or None}."""
    mapping = mapping_for(c.model)
    mapping.check_exportable(c.model)
    dtype = dtype or c.dtype
    section = get_arch(c.model.arch).section_args(c)  # BERT's adapter takes the bert section too
    tensors = {k: v.to(dtype) for k, v in mapping.to_hf(c.model, c.tensors, *section).items()}
    return write_hf_dir(c.model, section, tensors, out_dir, dtype=dtype,
                        tokenizer=Path(tokenizer) if tokenizer else c.tokenizer, max_shard_size=max_shard_size,
                        log=log)


def write_hf_dir(model: ModelConfig, section: tuple, tensors: dict[str, torch.Tensor], out_dir: Path, *,
                 dtype: torch.dtype, tokenizer: Optional[Path], max_shard_size: int = DEFAULT_MAX_SHARD,
                 quantization_config: Optional[dict] = None, log=print) -> dict:
    """config.json (+ ``quantization_config``), generation_config.json, the Hugging Face ``tensors`` and the
    tokenizer files in ``out_dir``. Returns {"tokenizer": check record or None}."""
    offline()
    from transformers import AutoConfig, GenerationConfig

    mapping = mapping_for(model)
    arch = get_arch(model.arch)
    ids = special_ids(tokenizer) if tokenizer is not None else {}
    fields = mapping.hf_config(model, ids, dtype_name(dtype), *section)
    if quantization_config is not None:
        fields["quantization_config"] = quantization_config
    config = AutoConfig.for_model(**fields)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    if arch.causal_lm:  # an encoder has no generation settings
        GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    save_hf_weights(tensors, out_dir, max_shard_size)
    record = None
    if tokenizer is not None:
        # an encoder's tokenizer frames pairs as [CLS] A [SEP] B [SEP]
        record = export_tokenizer(tokenizer, out_dir, bert=not arch.causal_lm)
        log(f"tokenizer: {tokenizer} -> {out_dir}/tokenizer.json ({record['tokenizer_class']}, "
            f"{record['texts_checked']} texts encode identically)")
    else:
        log("warning: no tokenizer known (pass --tokenizer): the export has no tokenizer files")
    return {"tokenizer": record}


def save_hf_weights(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int = DEFAULT_MAX_SHARD) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_safetensors({n: tensors[n].contiguous() for n in names}, out_dir / filename, metadata={"format": "pt"})
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


def _indexed_files(path: Path, index_name: str) -> list[Path]:
    """The weight files an HF index names, each confined to the model directory (a downloaded index could name
    ``../../secret`` or ``/etc/passwd``, read and reported back as tensors otherwise)."""
    index_path = path / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConversionError(f"{index_path} is not a Hugging Face weight index ({type(err).__name__}: "
                              f"{err})") from None
    return [confined_path(path, name, f"{index_path}: weight_map", ConversionError) for name in names]


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory (safetensors preferred; .bin via weights_only)."""
    from safetensors import safe_open

    path = Path(path)
    files: list[Path]
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        files = _indexed_files(path, "model.safetensors.index.json")
    elif (path / "pytorch_model.bin").is_file():
        files = [path / "pytorch_model.bin"]
    elif (path / "pytorch_model.bin.index.json").is_file():
        files = _indexed_files(path, "pytorch_model.bin.index.json")
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
    found = arch_for_hf_model_type(model_type)
    if found is None:
        raise UnsupportedArchitecture(f"{path}: model_type {model_type!r} has no largelm equivalent (supported: "
                                      "gpt2 -> style gpt2, llama -> style llama, mixtral -> arch moe, "
                                      "bert / megatron-bert -> arch bert)")
    arch, mapping = found
    fields = mapping.model_fields(hf_cfg)
    positions = fields["max_position_embeddings"]
    base_model = base_config.model if base_config is not None else None
    seq = base_model.seq_length if base_model else min(positions, DEFAULT_SEQ_LENGTH)
    if seq > positions:
        raise ConversionError(f"the training config's model.seq_length={seq} exceeds the imported model's "
                              f"max_position_embeddings={positions}")
    fields.setdefault("arch", arch.name)
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
    section = mapping.config_section(hf_cfg, hf) if arch.config_section else None  # BERT's bert: fields
    tensors = mapping.from_hf(model, hf, section) if section is not None else mapping.from_hf(model, hf)
    tokenizer = path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None
    config = None
    if base_config is not None:
        data = base_config.model_dump(mode="json")
        data["model"] = model.model_dump(mode="json")
        if section is not None:
            name = arch.config_section
            data[name] = {**(data.get(name) or {}),
                          **{k: getattr(section, k) for k in arch.section_weight_fields}}
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
                                                     "model_type": model_type}, tokenizer,
                     **({arch.config_section: section} if section is not None else {}))
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
    found = arch_for_hf_model_type(getattr(cfg, "model_type", None))
    probe = found[0].probe if found is not None else get_arch("gpt").probe  # unknown types: as a causal LM
    auto = getattr(transformers, probe.hf_auto_class(cfg))
    try:
        model = auto.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    except Exception as err:
        raise ConversionError(f"transformers cannot load {path}: {err}") from None
    model.eval()
    return probe.hf_forward(model, tokens)

"""Quantize a megatron GPTModel's linear layers, save/load the quantized checkpoint, and measure it.

Checkpoint directory (``save_quantized``)::

    model.safetensors    quantized layers: <layer>.qweight (int8 [N, K] signed | uint8 [N, K] asymmetric int8 |
                         uint8 [N, K/2] packed int4), <layer>.scale (fp16 [N, groups]), <layer>.zero (int4 and
                         asymmetric int8: uint8 [N, groups]), <layer>.bias,
                         <layer>.input_scale (AWQ, where not folded: fp32 [K], the input is divided by it);
                         every other tensor (embeddings, norms, output layer) as in GPTModel.state_dict(), bf16
    quant.json           {"format": "largelm-quant", "version": 1, "bits", "group_size", "sym", "method",
                         "layers", ...} (no "sym": the bits' default, int8 symmetric / int4 asymmetric)
    config.yaml          the training config of the source checkpoint (model shape, tokenizer)

``bits=16`` writes the same layout with no quantized layer (the bf16 baseline of the size comparison).
Quantized: the four linear layers of every transformer layer (``linear_qkv``, ``linear_proj``, ``linear_fc1``,
``linear_fc2``). Kept in bf16: word/position embeddings and the (possibly tied) output layer - their error hits
every token directly and, tied, they are one matrix - and the norms (tiny).

``load_quantized`` builds the GPTModel at TP=1 and swaps those layers for ``QuantLinear`` (integer weights,
dequantized on the fly; int8 with bf16/fp16 activations through ``torch._weight_int8pack_mm``).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import yaml
from safetensors.torch import load_file

from largelm.config import Config, ConfigError, ParallelConfig, config_from_dict, dump_config
from largelm.data import build_loader
from largelm.fileio import fsync_file, publish_dir, save_safetensors
from largelm.model.gpt import gpt_forward_loss, split_tokens
from largelm.model.registry import get_arch
from largelm.quant.awq import quantize_awq
from largelm.quant.core import (
    QuantFormat,
    QuantizationError,
    QuantizedWeight,
    hessian_accumulator,
    quantize_gptq,
    quantize_rtn,
    unpack_int4,
)
from largelm.quant.linear import QuantLinear

FORMAT = "largelm-quant"
VERSION = 1
WEIGHTS = "model.safetensors"
META = "quant.json"
TARGET = re.compile(r"^(decoder|encoder)\.layers\.\d+\.(self_attention\.linear_qkv|self_attention\.linear_proj|"
                    r"mlp\.linear_fc1|mlp\.linear_fc2)$")
STORE_DTYPE = torch.bfloat16
# what save_quantized and tools/quantize.py write into an output directory: only such a directory (or an empty
# one) is replaced by save_quantized
OUTPUT_FILES = {WEIGHTS, META, "config.yaml", "report.md", "report.json"}
METHODS = ("rtn", "gptq", "awq")


# --- what is quantized ----------------------------------------------------------------------------------------

def target_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """name -> module of every linear that is quantized; refuses models holding layers it cannot handle."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    targets = {}
    for name, module in model.named_modules():
        if TARGET.match(name):
            if type(module) not in (ColumnParallelLinear, RowParallelLinear):
                raise QuantizationError(f"{name}: {type(module).__name__} is not supported (only megatron's local "
                                        "ColumnParallelLinear/RowParallelLinear are quantized)")
            if getattr(module, "tp_size", 1) != 1 or getattr(module, "sequence_parallel", False):
                raise QuantizationError(f"{name}: tensor/sequence-parallel layers are not supported (TP=1 only)")
            targets[name] = module
        elif (name.startswith(("decoder.layers.", "encoder.layers."))
              and any(p.dim() >= 2 for p in module.parameters(recurse=False))):
            raise QuantizationError(f"{name}: {type(module).__name__} holds a weight matrix that this quantizer "
                                    "does not know (e.g. MoE experts or a Transformer Engine layer); refusing "
                                    "rather than leaving it silently unquantized")
    if not targets:
        raise QuantizationError("model has no transformer linear layers to quantize")
    return targets


def check_supported(cfg: Config) -> None:
    if cfg.model.arch not in ("gpt", "bert"):  # the layer names and forwards here are GPTModel's and BertModel's
        raise QuantizationError(f"model.arch={cfg.model.arch!r}: only GPT and BERT checkpoints are supported")
    if cfg.parallel.tensor_parallel != 1 or cfg.parallel.pipeline_parallel != 1:
        raise QuantizationError("only TP=1/PP=1 weights are supported (consolidate/convert the checkpoint first)")


# --- quantize -------------------------------------------------------------------------------------------------

@torch.no_grad()
def gpt_calibration_forward(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    input_ids, _, position_ids = split_tokens(tokens)
    model(input_ids, position_ids, None)


def collect_hessians(model: torch.nn.Module, names: Iterable[str], batches: Iterable,
                     forward: Callable = gpt_calibration_forward) -> dict:
    """``X^T X / n`` of each named linear's input over the calibration ``batches`` (``forward(model, batch)`` runs
    one: by default GPT token batches [b, s+1]; largelm.quant.bert passes BERT's masked batches)."""
    modules = dict(model.named_modules())
    accum, handles = {}, []
    for name in names:
        module = modules[name]
        update, result = hessian_accumulator(module.weight.shape[1])
        accum[name] = result
        handles.append(module.register_forward_pre_hook(lambda _m, args, _u=update: _u(args[0])))
    try:
        model.eval()
        for batch in batches:
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {name: result() for name, result in accum.items()}


@torch.no_grad()
def quantize_model(model: torch.nn.Module, fmt: QuantFormat, method: str = "rtn",
                   calibration: Optional[Iterable] = None, percdamp: float = 0.01,
                   awq_options: Optional[dict] = None, stats: Optional[dict] = None,
                   forward: Callable = gpt_calibration_forward) -> dict:
    """Quantize ``model``'s transformer linears in place (swapped for ``QuantLinear``); returns name -> module.

    ``method``: ``"rtn"`` (round to nearest), ``"gptq"`` or ``"awq"`` (both need ``calibration``: token batches
    [b, s+1]). GPTQ here collects all layers' input Hessians in one pass of the unquantized model (not
    layer-sequential). AWQ (largelm/quant/awq.py; ``awq_options``: its keyword arguments) also folds scales into
    the norms in place; its per-layer search results go into ``stats`` if given.
    """
    if method not in METHODS:
        raise QuantizationError(f"method={method!r}: use one of {', '.join(METHODS)}")
    targets = target_layers(model)
    for name, module in targets.items():
        fmt.check(name, tuple(module.weight.shape))
    if method != "rtn" and calibration is None:
        raise QuantizationError(f"method={method!r} needs calibration batches")
    hessians, awq_weights = {}, {}
    if method == "gptq":
        hessians = collect_hessians(model, targets, calibration, forward)
    if method == "awq":
        awq_weights, awq_stats = quantize_awq(model, targets, fmt, calibration, **(awq_options or {}))
        if stats is not None:
            stats.update(awq_stats)
    dtype = next(model.parameters()).dtype
    replaced = {}
    for name, module in targets.items():
        w = module.weight.detach().float()
        input_scale = None
        if method == "awq":
            qw, input_scale = awq_weights[name]
        else:
            qw = quantize_gptq(w, hessians[name], fmt, percdamp) if method == "gptq" else quantize_rtn(w, fmt)
        new = QuantLinear(qw, module.bias, module.skip_bias_add, dtype, input_scale)
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, new)
        replaced[name] = new
    return replaced


# --- save / load ----------------------------------------------------------------------------------------------

def save_quantized(model: torch.nn.Module, cfg: Config, out: str | Path, *, method: str, fmt: Optional[QuantFormat],
                   extra_meta: Optional[dict] = None) -> Path:
    """Write ``model`` (some layers ``QuantLinear``, or none with ``fmt=None``: the bf16 export) to ``out``.

    Atomic, like the training checkpoints (largelm/checkpoint/manager.py): the files are written and fsynced in a
    ``.partial-*`` directory next to ``out``, which is then renamed to ``out``; an existing ``out`` (a previous
    quantized checkpoint, or an empty directory) is swapped out only then. A crash or error leaves either the
    previous ``out`` or the new one, never torn files or new weights with old metadata.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QuantizationError(f"output directory {out} exists and is not a directory")
    if out.exists() and not {p.name for p in out.iterdir()} <= OUTPUT_FILES:
        raise QuantizationError(f"output directory {out} holds files other than a quantized checkpoint's "
                                f"({sorted({p.name for p in out.iterdir()} - OUTPUT_FILES)[:5]}); it would be "
                                "replaced as a whole: choose a new or empty directory")
    tensors, layers = {}, []
    quant_prefixes = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            if getattr(module, "perm", None) is not None:  # ActOrderQuantLinear (largelm/quant/hf_gptq.py)
                raise QuantizationError(f"{name}: act-order layers are written by the hf-gptq export only")
            layers.append(name)
            tensors[f"{name}.qweight"] = module.qweight.contiguous()
            tensors[f"{name}.scale"] = module.scale.contiguous()
            if module.zero is not None:
                tensors[f"{name}.zero"] = module.zero.contiguous()
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.to(STORE_DTYPE).contiguous()
            if module.input_scale is not None:
                tensors[f"{name}.input_scale"] = module.input_scale.contiguous()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor) or key.endswith("_extra_state"):
            continue
        if key.rsplit(".", 1)[0] in quant_prefixes:
            continue
        tensors[key] = value.detach().to(STORE_DTYPE).contiguous()
    meta = {"format": FORMAT, "version": VERSION, "method": method, "bits": fmt.bits if fmt else 16,
            "group_size": fmt.group_size if fmt else None, "sym": fmt.sym if fmt else None, "layers": layers,
            "stored_dtype": "bfloat16",
            **(extra_meta or {})}
    partial, replaced = out.parent / f".partial-{out.name}", out.parent / f".replaced-{out.name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (partial, replaced):  # left by a crashed save: never loaded
        shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir()
    try:
        save_safetensors(tensors, partial / WEIGHTS, metadata={"format": FORMAT, "quant": json.dumps(meta)})
        (partial / META).write_text(json.dumps(meta, indent=1))
        (partial / "config.yaml").write_text(dump_config(cfg))
        for name in (WEIGHTS, META, "config.yaml"):
            fsync_file(partial / name)
        publish_dir(partial, out, replaced)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file() or not (path / WEIGHTS).is_file():
        raise QuantizationError(f"{path} is not a quantized largelm checkpoint (needs {WEIGHTS} and {META})")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise QuantizationError(f"{meta_file}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                                f"expected {FORMAT!r} version {VERSION}")
    return meta


def build_model(cfg: Config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An (uninitialised-weights) TP=1 model of ``cfg``'s shape (its architecture's dense module, a GPTModel);
    megatron parallel_state must be set up."""
    arch = get_arch(cfg.model.arch)
    return arch.build_model(cfg.model, ParallelConfig(), *arch.section_args(cfg), dtype=dtype)


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Config]:
    """``(model, config)`` from a ``save_quantized`` directory: GPTModel (TP=1, eval mode) computing in ``dtype``.

    Needs megatron's parallel_state at TP=1 (``largelm.quant.single_process_parallel_state()`` sets it up).
    """
    path = Path(path)
    meta = read_meta(path)
    cfg = config_from_dict(yaml.safe_load((path / "config.yaml").read_text()), source=str(path / "config.yaml"))
    check_supported(cfg)
    tensors = load_file(str(path / WEIGHTS))
    model = build_model(cfg, dtype)
    fmt = QuantFormat(meta["bits"], meta["group_size"], meta.get("sym")) if meta["bits"] in (4, 8) else None
    targets = target_layers(model)
    if set(meta["layers"]) - set(targets):
        raise QuantizationError(f"{path}: quantized layers {sorted(set(meta['layers']) - set(targets))} do not "
                                "exist in the model built from config.yaml")
    for name in meta["layers"]:
        module = targets[name]
        q = tensors.pop(f"{name}.qweight")
        q = unpack_int4(q) if fmt.bits == 4 else q
        zero = tensors.pop(f"{name}.zero", None)
        qw = QuantizedWeight(q, tensors.pop(f"{name}.scale").float(),
                             None if zero is None else zero.to(torch.int32), fmt)
        if tuple(q.shape) != tuple(module.weight.shape):
            raise QuantizationError(f"{path}: {name} has shape {tuple(q.shape)}, the model wants "
                                    f"{tuple(module.weight.shape)}")
        bias = tensors.pop(f"{name}.bias", None)
        new = QuantLinear(qw, bias, module.skip_bias_add, dtype, tensors.pop(f"{name}.input_scale", None))
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, new)
    result = model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    quantized = set(meta["layers"])
    missing = [k for k in result.missing_keys
               if not k.endswith("_extra_state") and k.rsplit(".", 1)[0] not in quantized]
    if missing or result.unexpected_keys:
        raise QuantizationError(f"{path}: weights do not fit the model: missing {missing}, "
                                f"unexpected {result.unexpected_keys}")
    return model.eval(), cfg


# --- measure --------------------------------------------------------------------------------------------------

@torch.no_grad()
def perplexity(model: torch.nn.Module, cfg: Config, datasets: Optional[list] = None, batch_size: int = 8,
               max_batches: Optional[int] = None) -> dict:
    """Token-level validation loss/perplexity over the validation shards with the real loader (one pass)."""
    datasets = datasets or [(s.path, s.weight) for s in cfg.data.valid]
    if not datasets:
        raise ConfigError("no validation data: the config has no data.valid and none was given")
    loader = build_loader(datasets=datasets, seq_length=cfg.model.seq_length, batch_size=batch_size, rank=0,
                          world_size=1, num_workers=0, shuffle_buffer=0, seed=cfg.data.seed, infinite=False)
    model.eval()

    def summed(batch):
        per_token, _ = gpt_forward_loss(model, batch["tokens"])
        return per_token.double().sum().item(), per_token.numel()

    return token_mean_loss(loader, summed, max_batches, f"validation data {datasets} yielded no batch")


def token_mean_loss(batches, summed_loss: Callable[[dict], tuple[float, int]], max_batches: Optional[int],
                    empty: str) -> dict:
    """``{"loss", "ppl", "tokens"}``: the token-weighted mean loss over (at most ``max_batches`` of) ``batches``;
    ``summed_loss(batch)`` -> (the batch's summed loss, its token count). ``empty``: the error when no token came."""
    total, tokens = 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        loss_sum, count = summed_loss(batch)
        total, tokens = total + loss_sum, tokens + count
    if tokens == 0:
        raise ConfigError(empty)
    loss = total / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens}


@torch.no_grad()
def compare_tokens_per_s(models: dict[str, torch.nn.Module], cfg: Config, batch_size: int = 8,
                         repeats: int = 7) -> dict[str, float]:
    """Forward tokens/s of several models, timed interleaved (A, B, A, B, ...) on the same batch so that machine
    load drifting during the measurement hits all alike; each model's fastest pass counts."""
    s = cfg.model.seq_length
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (batch_size, s), generator=g)
    pos = torch.arange(s).unsqueeze(0).expand(batch_size, s)
    best = {name: float("inf") for name in models}
    for model in models.values():
        model.eval()(ids, pos, None)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(ids, pos, None)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: batch_size * s / t for name, t in best.items()}


def dir_bytes(path: str | Path) -> int:
    return (Path(path) / WEIGHTS).stat().st_size

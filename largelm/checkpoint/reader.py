"""Read a largelm training checkpoint (DeepSpeed ZeRO 0-3, any TP x PP x DP layout) into the consolidated hub.

Per model-parallel rank (DeepSpeed's ``mp_rank_XX``: one TP shard of one pipeline stage) the fp32 master
weights are reassembled from the data-parallel ZeRO partitions by DeepSpeed's own zero_to_fp32 merge
(``_get_fp32_state_dict_from_zero2_checkpoint`` / ``..._zero3_checkpoint``, which know ZeRO's flattening,
alignment padding and partition order). We only replace its file loading: DeepSpeed unpickles with
``weights_only=False``; here every ``.pt`` file is read through ``largelm.parallel.deepspeed_compat``
(weights_only with an explicit allowlist of DeepSpeed's plain data classes). zero_to_fp32 itself assumes one
model-parallel rank, so we run it once per ``mp_rank``, then rename pipeline names to ``GPTModel`` names,
unshard tensor-parallel tensors (layout rules in ``layout.py``) and cut the vocabulary padding.

ZeRO stage 0: the fp32 masters of DeepSpeed's FP16_Optimizer (bf16 training), else the module weights DeepSpeed
stored (fp32 training; if neither fp32 copy exists the result says it came from bf16 module weights).

``consolidate_states`` also gives Adam's moments (same names, unsharding and vocabulary padding as the weights) and
step count (moments.py): what a resharded resume carries (elastic.py).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Callable, Optional

import torch

from largelm.checkpoint.consolidated import Consolidated, strip_vocab_padding
from largelm.checkpoint.experts import merge_zero12
from largelm.checkpoint.info import CheckpointInfo, model_state_files, optim_state_files
from largelm.checkpoint.moments import ADAM_MOMENTS, flat_moments, one_step, zero0_moments
from largelm.errors import ConversionError
from largelm.fileio import sha256_file
from largelm.model.layout import (
    DISTILL_PROJECTION,
    is_gated,
    mp_rank_coordinates,
    param_shapes,
    to_model_names,
    tp_partition,
)
from largelm.parallel.deepspeed_compat import UnsafeCheckpointError, safe_torch_load
from largelm.parallel.sharding import unshard_tensors


# --- safe loading --------------------------------------------------------------------------------------------
def load_pt(path: Path) -> dict:
    """A DeepSpeed/largelm ``.pt`` file through the shared security boundary
    (largelm.parallel.deepspeed_compat.safe_torch_load: ``torch.load(weights_only=True)`` with DeepSpeed's plain
    data classes allowlisted); clear errors otherwise."""
    try:
        return safe_torch_load(path)
    except UnsafeCheckpointError as err:
        raise ConversionError(f"{err} - refusing to unpickle it") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ConversionError(f"{path} cannot be read (truncated or corrupt?): {err}") from None


# --- per model-parallel rank -----------------------------------------------------------------------------------
def read_mp_rank(info: CheckpointInfo, mp_rank: int, log=None) -> tuple[dict[str, torch.Tensor], str]:
    """This model-parallel rank's weights under the module's own names (``GPTModel`` or pipeline names),
    TP-local shapes, and where they came from (``"zero fp32 master"`` or ``"module <dtype>"``)."""
    states, origin = read_mp_rank_states(info, mp_rank, log=log, moments=False)
    return states["fp32"], origin


def read_mp_rank_states(info: CheckpointInfo, mp_rank: int, log=None,
                        moments: bool = False) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
    """Like ``read_mp_rank``, as ``{"fp32": weights}``; with ``moments`` also ``"exp_avg"`` and ``"exp_avg_sq"``
    (Adam's moments, per parameter, merged from the ZeRO partitions by the same zero_to_fp32 merge as the master
    weights: they live in flat partitions of the same layout) and ``"step"`` ({"step": tensor}: Adam's step count).
    The model's tensors only (``_model_only``).
    """
    model_files = model_state_files(info, mp_rank)
    model_states = [load_pt(f) for f in model_files]
    optim_files = optim_state_files(info, mp_rank)
    if not optim_files:
        weights, origin = _module_weights(info, mp_rank, model_states[0])
        states = {"fp32": weights}
        if moments:
            states.update(zero0_moments(info, model_states[0], _dense_param_groups))
        return _model_only(states), origin
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        BUFFER_NAMES,
        FP32_FLAT_GROUPS,
        FROZEN_PARAM_FRAGMENTS,
        FROZEN_PARAM_SHAPES,
        OPTIMIZER_STATE_DICT,
        PARAM_ALIGNMENT_PADDINGS,
        PARAM_SHAPES,
        PARTITION_COUNT,
        SINGLE_PARTITION_OF_FP32_GROUPS,
        ZERO_STAGE,
    )  # fmt: skip
    from deepspeed.utils import zero_to_fp32 as z

    zero_model_states = []
    for f, sd in zip(model_files, model_states):
        if BUFFER_NAMES not in sd or PARAM_SHAPES not in sd:
            raise ConversionError(f"{f} is not a DeepSpeed model-states file")
        module = sd.get("module") or {}
        buffers = {k: (v.float() if v.is_floating_point() else v) for k, v in module.items() if k in sd[BUFFER_NAMES]}
        zero_model_states.append(z.zero_model_state(
            buffers=buffers, param_shapes=sd[PARAM_SHAPES], shared_params=list(sd.get("shared_params", {}).items()),
            ds_version=sd.get("ds_version"), frozen_param_shapes=sd.get(FROZEN_PARAM_SHAPES),
            frozen_param_fragments=sd.get(FROZEN_PARAM_FRAGMENTS)))
    optim = []
    for f in optim_files:
        state = load_pt(f)[OPTIMIZER_STATE_DICT]
        if not moments:
            state.pop(BASE_OPTIMIZER_STATE, None)  # Adam moments: not needed for weights
        optim.append(state)
    if ZERO_STAGE in optim[0]:
        stage = int(optim[0][ZERO_STAGE])
    elif SINGLE_PARTITION_OF_FP32_GROUPS in optim[0]:
        # DeepSpeed's BF16_Optimizer (bf16 + ZeRO-1) records no stage, but writes the same flat fp32 partitions
        # (parameters in group order, padded at the end to 2 x DP) as ZeRO-1/2, which zero_to_fp32 merges.
        stage = 1
    else:
        raise ConversionError(f"{optim_files[0]} is neither a ZeRO nor a BF16_Optimizer partition")
    if stage != info.zero_stage:
        raise ConversionError(f"{optim_files[0]} is a ZeRO-{stage} partition but the checkpoint config says "
                              f"ZeRO-{info.zero_stage}")
    counts = optim[0][PARTITION_COUNT]  # per parameter group; expert groups (EP > 1) have fewer (experts.py)
    partitions = max(counts) if isinstance(counts, list) else int(counts)
    if partitions != len(optim_files):
        raise ConversionError(f"{info.path}: model-parallel rank {mp_rank} has {len(optim_files)} ZeRO partitions but "
                              f"they were written by {partitions} data-parallel ranks")
    key = FP32_FLAT_GROUPS if stage == 3 else SINGLE_PARTITION_OF_FP32_GROUPS
    flat = {"fp32": [o[key] for o in optim]}
    steps = set()
    if moments:
        for name in ADAM_MOMENTS:
            flat[name] = []
        for f, o in zip(optim_files, optim):
            # ZeRO-3 keeps the torch optimizer's state dict under its own name
            base = o.get(OPTIMIZER_STATE_DICT if stage == 3 else BASE_OPTIMIZER_STATE)
            per_key, step = flat_moments(f, o[key], base)
            steps.add(float(step))
            for name in ADAM_MOMENTS:
                flat[name].append(per_key[name])
    out = io.StringIO()  # zero_to_fp32 prints progress; keep the CLI's output readable
    states = {}
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        for name, flat_groups in flat.items():
            if stage == 3:
                merged = z._get_fp32_state_dict_from_zero3_checkpoint(partitions, flat_groups, zero_model_states,
                                                                      False)
            else:
                merged = merge_zero12(z, partitions, counts, flat_groups, zero_model_states,
                                      [o.get(PARAM_ALIGNMENT_PADDINGS) for o in optim])
            states[name] = {k: v.clone() for k, v in z.to_torch_tensor(merged).items()}
    if log:
        for line in out.getvalue().splitlines():
            log(f"  [zero_to_fp32 mp_rank {mp_rank:02d}] {line}")
    if moments:
        states["step"] = {"step": one_step(steps, f"{info.path} mp_rank {mp_rank:02d}")}
    return _model_only(states), "zero fp32 master"


def _model_only(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Without a distillation student's training-only ``distill_projection`` (not part of the model: exports,
    conversions and teacher reads see the model alone)."""
    return {key: {k: v for k, v in tensors.items() if not k.startswith(DISTILL_PROJECTION + ".")}
            for key, tensors in states.items()}


def _module_weights(info: CheckpointInfo, mp_rank: int, model_state: dict) -> tuple[dict, str]:
    masters = _zero0_masters(model_state, info.config.model, info.config.bert)
    if masters is not None:
        return masters, "fp32 master (ZeRO-0 optimizer)"
    module = model_state.get("module")
    if module is None:  # pipeline engine: layers are in per-layer files
        stage, tp_rank = mp_rank_coordinates(mp_rank, info.tensor_parallel)
        module = {}
        for f in sorted(info.path.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt")):
            index = int(f.name.split("-")[0][len("layer_"):])
            for key, tensor in load_pt(f).items():
                module[f"{index}.{key}"] = tensor
        names = {n for shapes in model_state.get("param_shapes", []) for n in shapes}
        module = {k: v for k, v in module.items() if k in names or _tied_alias(k, names)}
    weights = {k: v for k, v in module.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    if not weights:
        raise ConversionError(f"{info.path}: no weights found for model-parallel rank {mp_rank}")
    dtype = next(iter(weights.values())).dtype
    return {k: v.float() for k, v in weights.items()}, f"module {dtype}".replace("torch.", "")


def _zero0_masters(model_state: dict, model, bert=None) -> Optional[dict]:
    """ZeRO-0 with bf16: DeepSpeed's FP16_Optimizer keeps fp32 masters per parameter group (``fp32_groups``: one
    tensor per parameter; ``fp32_groups_flat``: one flat tensor per group), in the order of the optimizer's
    parameter groups. DeepSpeed records no ``param_shapes`` without ZeRO, so for the dense model they are
    rebuilt from largelm's rule (largelm.train.optim.param_groups: "decay" = matrices in model order, then
    "no_decay" = biases and 1-D gains) and checked against the tensors; None when anything disagrees."""
    optimizer = model_state.get("optimizer")
    shapes = model_state.get("param_shapes") or _dense_param_groups(model_state, model, bert)
    if not isinstance(optimizer, dict) or not shapes:
        return None
    out = {}
    if isinstance(optimizer.get("fp32_groups"), list):
        groups = optimizer["fp32_groups"]
        if len(groups) != len(shapes):
            return None
        for names, tensors in zip(shapes, groups):
            if len(names) != len(tensors):
                return None
            for (name, shape), tensor in zip(names.items(), tensors):
                if tuple(tensor.shape) != tuple(shape):
                    return None
                out[name] = tensor.float().clone()
        return out
    if isinstance(optimizer.get("fp32_groups_flat"), list):
        flats = optimizer["fp32_groups_flat"]
        if len(flats) != len(shapes):
            return None
        for names, flat in zip(shapes, flats):
            offset = 0
            for name, shape in names.items():
                n = int(torch.Size(shape).numel())
                out[name] = flat[offset:offset + n].view(tuple(shape)).float().clone()
                offset += n
            if offset > flat.numel():
                return None
        return out
    return None


def _dense_param_groups(model_state: dict, model, bert=None) -> Optional[list]:
    module = model_state.get("module") or {}
    if not module or not all(n in module for n in param_shapes(model, bert)):
        return None  # not a dense GPTModel (e.g. a pipeline stage): no rule to rebuild the groups
    decay, no_decay = {}, {}
    for name in param_shapes(model, bert):
        tensor = module[name]
        (no_decay if tensor.ndim < 2 or name.endswith(".bias") else decay)[name] = tuple(tensor.shape)
    for name in (n for n in module if n.startswith(DISTILL_PROJECTION + ".")):  # registered last (distill_bert.py)
        decay[name] = tuple(module[name].shape)
    optimizer = model_state.get("optimizer") or {}  # FP16_Optimizer nests the torch state dict; ZeRO-0 fp32 not
    groups = optimizer.get("optimizer_state_dict", optimizer).get("param_groups", [])
    if [g.get("name") for g in groups] != ["decay", "no_decay"][: len(groups)]:
        return None
    return [decay, no_decay][: len(groups)]


def _tied_alias(key: str, names: set) -> bool:
    return key.startswith("0.") and ("tied_modules.word_embeddings." + key[2:]) in names


# --- whole checkpoint ------------------------------------------------------------------------------------------
def consolidate_checkpoint(info: CheckpointInfo, log=print) -> Consolidated:
    """All ranks' weights -> one ``Consolidated`` (fp32, vocabulary padding recorded)."""
    return consolidate_states(info, log, moments=False)[0]


def consolidate_states(info: CheckpointInfo, log=print,
                       moments: bool = True) -> tuple[Consolidated, dict[str, Consolidated], Optional[torch.Tensor]]:
    """All ranks' fp32 master weights, and with ``moments`` Adam's ``exp_avg``/``exp_avg_sq`` (same names, shapes
    and vocabulary-padding records as the weights) and Adam's step: ``(weights, {moment: Consolidated}, step)``."""
    cfg = info.config
    model, tp, pp = cfg.model, info.tensor_parallel, info.pipeline_parallel
    gated = is_gated(model)
    keys = ("fp32", *ADAM_MOMENTS) if moments else ("fp32",)
    per_tp: dict[str, list[dict[str, torch.Tensor]]] = {k: [{} for _ in range(tp)] for k in keys}
    sources, steps = set(), set()
    for tp_rank in range(tp):
        merged, origins, rank_steps = _read_tp_rank(info, tp_rank, keys, log)
        for key in keys:
            per_tp[key][tp_rank] = merged[key]
        sources |= origins
        steps |= rank_steps
    step = one_step(steps, str(info.path)) if moments else None
    full = {key: _unshard_tp(info, per_tp[key], gated, log) for key in keys}
    weights, padding = strip_vocab_padding(full["fp32"], model.vocab_size)
    tokenizer = _recorded_tokenizer(info, log)
    source = {"kind": "largelm-checkpoint", "path": str(info.path), "step": info.step,
              "tensor_parallel": tp, "pipeline_parallel": pp, "data_parallel": info.data_parallel,
              "zero_stage": cfg.parallel.zero_stage, "engine_zero_stage": info.zero_stage,
              "precision": cfg.train.precision, "weights": sorted(sources)}
    if any(s.startswith("module bfloat16") for s in sources):
        log(f"warning: {info.path} has no ZeRO fp32 master weights (ZeRO-0); using the bf16 module weights")
    consolidated = Consolidated(weights, model, cfg, padding, info.step, source, tokenizer, bert=cfg.bert)
    moment_states = {}
    for key in keys[1:]:
        tensors, pad = strip_vocab_padding(full[key], model.vocab_size)
        moment_states[key] = Consolidated(tensors, model, cfg, pad, info.step, source, None, bert=cfg.bert)
    return consolidated, moment_states, step


def tp_rank_weights(info: CheckpointInfo, tp_rank: int, log=print,
                    keep: Optional[Callable[[str], bool]] = None) -> tuple[dict[str, torch.Tensor], str]:
    """TP rank ``tp_rank``'s fp32 weights as the checkpoint holds them (its shard of each tensor-parallel tensor at
    the checkpoint's TP and padded vocabulary, the replicated tensors whole), every pipeline stage merged, under
    ``GPTModel``/``BertModel`` names; and where they came from. Reads only that TP rank's files (all its stages'
    model states and ZeRO partitions): 1/TP of the checkpoint (tp_slice.py cuts other TPs' shards from these).
    ``keep``: only the names it accepts are kept, dropped as each model-parallel rank's file is read (a pipelined
    distillation teacher's stage keeps its own layers: the peak is one source stage plus what is kept)."""
    if not 0 <= tp_rank < info.tensor_parallel:
        raise ConversionError(f"{info.path}: TP rank {tp_rank} out of range (the checkpoint has TP="
                              f"{info.tensor_parallel})")
    merged, origins, _ = _read_tp_rank(info, tp_rank, ("fp32",), log, keep)
    return merged["fp32"], ", ".join(sorted(origins))


def _read_tp_rank(info: CheckpointInfo, tp_rank: int, keys: tuple[str, ...], log,
                  keep: Optional[Callable[[str], bool]] = None) -> tuple[dict[str, dict[str, torch.Tensor]], set, set]:
    """The model-parallel ranks of ``tp_rank`` (one per pipeline stage) merged: ``({key: {model name: tensor}},
    weight origins, Adam steps)``; ``keys`` "fp32" and with Adam's moments ``ADAM_MOMENTS``."""
    model, tp = info.config.model, info.tensor_parallel
    moments = len(keys) > 1
    merged: dict[str, dict[str, torch.Tensor]] = {k: {} for k in keys}
    sources, steps = set(), set()
    for m in range(info.model_parallel):
        if mp_rank_coordinates(m, tp)[1] != tp_rank:
            continue
        native, origin = read_mp_rank_states(info, m, log=None, moments=moments)
        sources.add(origin)
        if moments:
            steps.add(float(native["step"]["step"]))
        for key in keys:
            for name, tensor in to_model_names(native[key], model).items():
                if keep is not None and not keep(name):
                    continue
                if name in merged[key]:  # the tied embedding on the first and the last stage
                    _check_replica(name, merged[key][name], tensor, f"pipeline stages (TP rank {tp_rank})", log)
                    continue
                merged[key][name] = tensor
    return merged, sources, steps


def _unshard_tp(info: CheckpointInfo, per_tp: list[dict[str, torch.Tensor]], gated: bool, log) -> dict:
    """The TP ranks' tensors of one kind (weights or a moment) -> full tensors at the padded vocabulary."""
    cfg, tp = info.config, info.tensor_parallel
    model = cfg.model
    names = list(per_tp[0])
    for r in range(1, tp):
        if set(per_tp[r]) != set(names):
            raise ConversionError(f"{info.path}: TP rank {r} holds other tensors than TP rank 0: "
                                  f"{sorted(set(per_tp[r]) ^ set(names))[:6]}")
    padded = model.padded_vocab_size(tp)
    expected = param_shapes(model, cfg.bert, vocab_rows=padded)
    full: dict[str, torch.Tensor] = {}
    for name in names:
        if name not in expected:
            raise ConversionError(f"{info.path}: tensor {name} is not a parameter of this model config")
        layout = tp_partition(name, gated)
        if layout is None or tp == 1:
            tensor = per_tp[0][name]
            for r in range(1, tp):
                _check_replica(name, tensor, per_tp[r][name], f"TP ranks 0 and {r}", log)
        else:
            tensor = unshard_tensors([per_tp[r][name] for r in range(tp)], dim=layout[0], stride=layout[1])
        if tuple(tensor.shape) != expected[name]:
            raise ConversionError(f"{info.path}: {name} unshards to {tuple(tensor.shape)}, expected {expected[name]} "
                                  f"(TP={tp}, padded vocabulary {padded})")
        full[name] = tensor.contiguous()
    missing = [n for n in expected if n not in full]
    if missing:
        raise ConversionError(f"{info.path}: the checkpoint lacks {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    return full


def _recorded_tokenizer(info: CheckpointInfo, log) -> Optional[Path]:
    """The tokenizer file the checkpoint's config names, if it is the one the run trained with: its sha256 must be
    the one the manifest records. A checkpoint may come from elsewhere, and its config.yaml may name any file on
    this machine (``~/.ssh/id_rsa``): only a verified tokenizer is copied into the converter's output."""
    tokenizer = Path(info.config.tokenizer.model)
    recorded = info.manifest.get("tokenizer_sha256")
    if not tokenizer.is_file():
        log(f"note: the checkpoint's tokenizer.model {tokenizer} is not found from here (a relative path?); the result "
            "has no tokenizer (pass --tokenizer)")
        return None
    if recorded != sha256_file(tokenizer):
        why = "records no tokenizer sha256" if not recorded else f"records tokenizer sha256 {str(recorded)[:12]}..."
        log(f"note: the checkpoint's manifest {why}, and {tokenizer} does not match it; the result has no tokenizer "
            "(pass --tokenizer)")
        return None
    return tokenizer


def _check_replica(name: str, a: torch.Tensor, b: torch.Tensor, where: str, log) -> None:
    if a.shape != b.shape:
        raise ConversionError(f"{name}: shapes differ between {where}: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    if diff > 0 and log:
        log(f"warning: replicated tensor {name} differs between {where} by up to {diff:.3e}; using the first copy")

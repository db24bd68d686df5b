"""Write a model as a largelm *training checkpoint* in any TP x PP x DP layout, resumable by the trainer.

How: the checkpoint is written by the real thing. ``tp * pp * dp`` ranks are spawned (gloo, CPU); each builds
the training step driver for the target config exactly as the trainer does (``largelm.train.step.build_step``,
which loads this rank's shard of the full weights with ``load_full_state_dict`` before DeepSpeed wraps the
model), sets DeepSpeed's fp32 master copy to the exact fp32 weights (``safe_set_full_fp32_param``: with bf16
training the master would otherwise be the bf16-rounded weights), positions the LR schedule and step counters
at the source's step, and saves with ``CheckpointManager.save``. So every file is DeepSpeed's own format for
that layout and ZeRO stage, with the manifest, ``latest`` pointer, config.yaml and per-rank trainer states the
trainer expects.

Optimizer state: from a training checkpoint it is carried (``optimizer_from``): every rank reads the source's
full state and writes its shard of the fp32 masters, Adam moments and step, the LR schedule and DeepSpeed's
counters into its engine - the same code as a resume with ``checkpoint.reshard_on_resume``
(largelm/checkpoint/elastic.py). With ``--drop-optimizer`` (and from consolidated/Hugging Face sources, which
have none) the new checkpoint holds a fresh optimizer state (moments zero, Adam step 0) at the source's
training step, so the LR schedule continues where it was.

Trainer state per rank: the step; the data position - the loader states are copied when the data-parallel size is
unchanged (rank ``r`` gets the state of the source's data-parallel rank ``dp(r)``), otherwise (or from a
consolidated/Hugging Face source) every rank starts a fresh pass over the data (this needs the datasets of
``data.train`` to exist); fresh RNG states (seeded like the trainer's); and whatever else the trainer keeps (e.g.
the step guard's running loss statistics) copied from the source's rank 0.

Verification, inside the same ranks: a second, randomly initialised engine loads the checkpoint through
``CheckpointManager.load`` (the trainer's resume path); its fp32 master weights must equal the converted
weights exactly, and an fp32 model of the target layout built from them gives the logits compared with the
source's.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from largelm.checkpoint import elastic
from largelm.checkpoint.consolidated import Consolidated, load_consolidated, save_consolidated
from largelm.checkpoint.manager import Checkpoint, CheckpointManager
from largelm.checkpoint.reader import load_pt
from largelm.config import Config, ConfigError, ModelConfig, apply_override, config_from_dict, dump_config
from largelm.convert import verify
from largelm.convert.spawn import run_ranks
from largelm.errors import ConversionError
from largelm.model.layout import check_pipeline_parallel, check_tensor_parallel
from largelm.model.registry import get_arch
from largelm.parallel import groups
from largelm.parallel.cpu_compat import model_parallel_manual_seed
from largelm.parallel.sharding import shard_tensor
from largelm.train.rng import capture_rng_state
from largelm.train.step import build_step
from largelm.train.trainer import build_run_loader

# Model fields the converted weights fix (make_vocab_size_divisible_by is free: we re-pad).
FIXED_MODEL_FIELDS = tuple(f for f in ModelConfig.SHAPE_FIELDS if f != "make_vocab_size_divisible_by") + (
    "rotary_base", "norm_epsilon")


def target_config(c: Consolidated, *, tensor_parallel: int, pipeline_parallel: int, out_root: Path,
                  base: Optional[Config] = None, zero_stage: Optional[int] = None,
                  overrides: tuple = ()) -> Config:
    """The training config of the converted checkpoint: ``base`` (or the source's own config) with the model
    shape of ``c``, the new layout, ``checkpoint.dir = out_root`` and ``overrides`` (``section.field=value``)."""
    base = base or c.config
    if base is None:
        raise ConversionError("the source carries no training config (it came from Hugging Face or was consolidated "
                              "from one): pass --config with the tokenizer, data, optimizer and train sections")
    data = base.model_dump(mode="json")
    model = c.model.model_dump(mode="json")
    for key in FIXED_MODEL_FIELDS:
        data["model"][key] = model[key]
    arch = get_arch(c.model.arch)
    section = arch.section(c)
    if section is not None:  # the section fields that decide the parameter set (BERT's) come with the weights
        name = arch.config_section
        data[name] = {**(data.get(name) or {}), **{k: getattr(section, k) for k in arch.section_weight_fields}}
    if not Path(data["tokenizer"]["model"]).is_file() and c.tokenizer is not None and Path(c.tokenizer).is_file():
        data["tokenizer"]["model"] = str(Path(c.tokenizer).resolve())  # the copy kept with the consolidated model
    parallel = data["parallel"]
    parallel["tensor_parallel"], parallel["pipeline_parallel"] = tensor_parallel, pipeline_parallel
    if tensor_parallel == 1:
        parallel["sequence_parallel"] = False
    if pipeline_parallel == 1:
        parallel["virtual_pipeline"] = None
    if zero_stage is not None:
        parallel["zero_stage"] = zero_stage
    if c.model.moe is not None:  # written with every expert on each rank (the writer sets up no expert groups)
        parallel["expert_parallel"] = 1
    data["checkpoint"]["dir"] = str(out_root)
    data["checkpoint"]["resume"] = True
    for item in overrides:
        try:
            apply_override(data, item, source="--set")
        except ConfigError as err:
            raise ConversionError(str(err)) from None
    try:
        cfg = config_from_dict(data, source="target layout")
    except ConfigError as err:
        raise ConversionError(f"the target layout is invalid for this model:\n{err}") from None
    changed = [f"model.{k}: {getattr(cfg.model, k)!r} (weights have {model[k]!r})"
               for k in FIXED_MODEL_FIELDS if getattr(cfg.model, k) != model[k]]
    if c.model.style == "gpt2" and cfg.model.positions != c.model.positions:
        changed.append(f"learned position table: the weights have {c.model.positions} rows, the config gives "
                       f"{cfg.model.positions} (model.max_position_embeddings / model.seq_length)")
    if section is not None:
        target = arch.section(cfg)
        changed += [f"{arch.config_section}.{k}: {getattr(target, k)!r} (weights have {getattr(section, k)!r})"
                    for k in arch.section_weight_fields if getattr(target, k) != getattr(section, k)]
    if changed:
        raise ConversionError("the target config does not fit the converted weights (check --config/--set): "
                              + "; ".join(changed))
    if cfg.parallel.expert_parallel > 1:
        raise ConversionError(f"parallel.expert_parallel={cfg.parallel.expert_parallel}: the converter writes MoE "
                              "training checkpoints at expert_parallel=1; train on at another expert-parallel size "
                              "with checkpoint.reshard_on_resume=true (elastic resume moves the experts)")
    check_tensor_parallel(cfg.model, tensor_parallel)
    check_pipeline_parallel(cfg.model, pipeline_parallel)
    return cfg


def source_data_states(info, cfg: Config, world_size: int, log=print) -> Optional[list]:
    """Per target rank, the loader state of the source's same data-parallel rank (None: start afresh)."""
    dp_target = world_size // cfg.parallel.model_parallel
    if info is None:
        return None
    if info.data_parallel != dp_target:
        first = info.path / "trainer_state_rank00000.pt"
        merged = load_pt(first)["data"].get("global") if first.is_file() else None
        if merged is None:
            log(f"note: data-parallel size changes ({info.data_parallel} -> {dp_target}) and {info.path} has no "
                "layout-independent data position (an older largelm): the converted run starts a fresh pass")
            return None
        log(f"data position: the layout-independent position of {info.data_parallel} data-parallel ranks, shared "
            f"among {dp_target} (none repeated, none skipped)")
        return [merged] * world_size
    states = []
    tp = cfg.parallel.tensor_parallel
    for rank in range(world_size):
        dp_rank = (rank // tp) % dp_target
        src_rank = info.tensor_parallel * dp_rank  # TP rank 0, first stage, same data-parallel rank
        path = info.path / f"trainer_state_rank{src_rank:05d}.pt"
        if not path.is_file():
            raise ConversionError(f"{info.path} has no {path.name}: it is incomplete")
        states.append(load_pt(path)["data"])
    return states


def source_extra_state(info) -> dict:
    """What else the trainer keeps per rank besides step, data position and RNG (e.g. the step guard's running
    loss statistics, identical on every rank): taken from the source's rank 0 and given to every new rank."""
    if info is None:
        return {}
    path = info.path / "trainer_state_rank00000.pt"
    if not path.is_file():
        raise ConversionError(f"{info.path} has no {path.name}: it is incomplete")
    return {k: v for k, v in load_pt(path).items() if k not in ("step", "data", "rng")}


def _local_full_value(name: str, param: torch.nn.Parameter, full: dict, model, tp_rank: int, tp: int):
    """The exact fp32 value this rank's parameter ``name`` should hold, cut from the full weights with the
    partition attributes megatron put on the parameter."""
    value = full[get_arch(model.arch).dense_name(name, model)]
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        value = shard_tensor(value, tp_rank, tp, param.partition_dim, getattr(param, "partition_stride", 1))
    return value.float()


def _fp32_masters(engine) -> dict[str, torch.Tensor]:
    """name -> the fp32 master copy DeepSpeed optimizes (collective under ZeRO); the parameter itself when
    there is no separate master."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in engine.module.named_parameters():
        master = safe_get_full_fp32_param(param)
        out[name] = (master if master is not None else param.detach()).float().cpu().clone()
    return out


def _write_rank(rank: int, world_size: int, hub_dir: str, cfg_dict: dict, step: int, data_states, extra_state: dict,
                meta: dict, tokens: np.ndarray, optimizer_from: Optional[str] = None) -> dict:
    from deepspeed.utils import safe_set_full_fp32_param
    from megatron.core import parallel_state


    cfg = config_from_dict(cfg_dict, source="target layout")
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    c = load_consolidated(Path(hub_dir))
    full = {k: v.float() for k, v in c.padded_tensors(cfg.model.padded_vocab_size(tp)).items()}
    groups.init_distributed("gloo")
    try:
        groups.init_model_parallel(tp, pp)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        torch.manual_seed(cfg.train.seed)
        model_parallel_manual_seed(cfg.train.seed)
        stepper = build_step(cfg, world_size, init_state_dict=full)
        engine = stepper.engine
        expected = {name: _local_full_value(name, p, full, cfg.model, tp_rank, tp)
                    for name, p in engine.module.named_parameters()}
        for name, param in engine.module.named_parameters():
            safe_set_full_fp32_param(param, expected[name])
        if optimizer_from is not None:  # the source's masters, Adam state, schedule and counters, resharded
            try:
                source = elastic.read_reshard_source(Path(optimizer_from))
            except ConversionError as err:
                raise ConversionError(f"{err} (pass --drop-optimizer to write a fresh optimizer state)") from None
            elastic.load_into_engine(engine, cfg, source, tp_rank)
            del source
        elif step > 0:  # the LR of step `step` and DeepSpeed's own counters, as after `step` optimizer steps
            engine.lr_scheduler.last_epoch = step - 1
            engine.lr_scheduler.step()
            engine.global_steps = step
            engine.global_samples = step * cfg.global_batch_size(world_size)
        if data_states is not None:
            data = data_states[rank]
        else:
            data = build_run_loader(cfg, dp_rank, dp_size).state_dict()
        manager = CheckpointManager(cfg.checkpoint.dir, keep_last=cfg.checkpoint.keep_last,
                                    config_yaml=dump_config(cfg),
                                    meta={"world_size": world_size, "tensor_parallel": tp, "pipeline_parallel": pp,
                                          "zero_stage": cfg.parallel.zero_stage, **meta})
        path = manager.save(engine, step, {**extra_state, "step": step, "data": data, "rng": capture_rng_state()})
        del stepper, engine
        gc.collect()

        # --- verification through the trainer's resume path -------------------------------------------
        model_parallel_manual_seed(cfg.train.seed + 1)  # a differently initialised engine
        fresh = build_step(cfg, world_size)
        state = manager.load(fresh.engine, Checkpoint(path, step))
        masters = _fp32_masters(fresh.engine)
        weight_diff = max((masters[n] - expected[n]).abs().max().item() for n in expected)
        module_diff = max((p.detach().float().cpu() - masters[n]).abs().max().item()
                          for n, p in fresh.engine.module.named_parameters() if p.numel())
        del fresh
        gc.collect()
        model = verify.build_model(cfg.model, cfg.parallel, owner=cfg)
        verify.load_native(model, masters, f"converted checkpoint rank {rank}")
        logits = verify.layout_forward(model, torch.from_numpy(tokens), cfg.model)
        return {"path": str(path), "loaded_step": int(state["step"]), "weight_diff": weight_diff,
                "module_diff": module_diff, "logits": None if dp_rank else verify.to_numpy(logits)}
    finally:
        groups.destroy()


def write_training_checkpoint(c: Consolidated, cfg: Config, out_root: Path, *, world_size: int,
                              data_states: Optional[list] = None, extra_state: Optional[dict] = None,
                              tokens: torch.Tensor, meta: Optional[dict] = None,
                              hub_dir: Optional[Path] = None, timeout_s: Optional[float] = None,
                              optimizer_from: Optional[Path] = None, log=print) -> tuple[Path, torch.Tensor, dict]:
    """Spawn the target layout's ranks and write the checkpoint; returns (step directory, target-layout logits,
    {"weight_diff", "module_diff"} maxima over ranks)."""
    out_root = Path(out_root)
    if out_root.exists() and any(p.name.startswith(("step_", ".partial-", "latest")) for p in out_root.iterdir()):
        raise ConversionError(f"output directory {out_root} already holds checkpoints; choose a new directory")
    out_root.mkdir(parents=True, exist_ok=True)
    step = c.step or 0
    if step >= cfg.train.steps:
        log(f"note: the checkpoint is at step {step} but train.steps={cfg.train.steps}: raise train.steps "
            "(e.g. --set train.steps=N) to continue training")
    tmp = None
    try:
        if hub_dir is None:
            tmp = Path(tempfile.mkdtemp(prefix=".convert-hub-", dir=out_root))
            hub_dir = save_consolidated(tmp, c)
        log(f"writing a TP={cfg.parallel.tensor_parallel} PP={cfg.parallel.pipeline_parallel} "
            f"DP={world_size // cfg.parallel.model_parallel} ZeRO-{cfg.parallel.zero_stage} "
            f"{cfg.train.precision} checkpoint at step {step} with {world_size} ranks")
        results = run_ranks(_write_rank, world_size, str(hub_dir), cfg.model_dump(mode="json"), step, data_states,
                            extra_state or {}, meta or {}, tokens.numpy(),
                            None if optimizer_from is None else str(optimizer_from), timeout_s=timeout_s)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    path = Path(results[0]["path"])
    loaded = {r["loaded_step"] for r in results}
    if loaded != {step}:
        raise ConversionError(f"the written checkpoint resumes at step(s) {sorted(loaded)}, expected {step}")
    logits = next(r["logits"] for r in results if r["logits"] is not None)
    logits = (tuple(None if t is None else torch.from_numpy(t) for t in logits) if isinstance(logits, tuple)
              else torch.from_numpy(logits))
    diffs = {"weight_diff": max(r["weight_diff"] for r in results),
             "module_diff": max(r["module_diff"] for r in results)}
    return path, verify.cut_vocab(logits, c.model.vocab_size), diffs


def write_conversion_record(out_root: Path, record: dict) -> None:
    (Path(out_root) / "conversion.json").write_text(json.dumps(record, indent=1, default=str) + "\n")

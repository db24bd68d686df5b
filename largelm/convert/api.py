"""The conversions, each one verified: what ``largelm-convert`` runs (usable from Python too).

Every function opens its source (training checkpoint, consolidated directory or Hugging Face directory),
converts through the consolidated hub, writes the result, then compares the logits of source and result on the
fixed batch (verify.py) and raises ``VerificationError`` above the tolerance. The comparisons are returned and
recorded next to the result (``largelm.json`` "verification", ``conversion.json``, ``largelm_conversion.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from largelm.checkpoint.consolidated import META, load_consolidated, parse_dtype, save_consolidated
from largelm.checkpoint.info import checkpoint_summary
from largelm.config import Config, ConfigError, load_config
from largelm.convert import hf, verify
from largelm.convert.hf import read_hf_config
from largelm.convert.reshard import (
    source_data_states,
    source_extra_state,
    target_config,
    write_conversion_record,
    write_training_checkpoint,
)
from largelm.convert.source import Source, open_source
from largelm.errors import ConversionError, VerificationError


def _tol(override: Optional[float], *dtypes: torch.dtype, reference: torch.Tensor) -> float:
    return override if override is not None else verify.tolerance(*dtypes, reference=reference)


def _base_config(path: Optional[Path]) -> Optional[Config]:
    if path is None:
        return None
    try:
        return load_config(path)
    except ConfigError as err:
        raise ConversionError(str(err)) from None


def consolidate(source, out_dir, *, tag: Optional[str] = None, dtype: Optional[str] = None, checksums: bool = True,
                verify_logits: bool = True, tolerance: Optional[float] = None, base_config: Optional[Path] = None,
                tokenizer: Optional[Path] = None, log=print) -> list[verify.Check]:
    """Any source -> consolidated directory (training checkpoint: ZeRO partitions merged, TP/PP unsharded)."""
    src = open_source(source, tag, checksums=checksums, base_config=_base_config(base_config), log=log)
    log(f"source: {src.describe()}")
    c = src.consolidated()
    if tokenizer is not None:
        if not Path(tokenizer).is_file():
            raise ConversionError(f"--tokenizer {tokenizer} does not exist")
        c.tokenizer = Path(tokenizer)
    if dtype is not None:
        c = c.cast(parse_dtype(dtype))
    out_dir = Path(out_dir)
    save_consolidated(out_dir, c)
    log(f"wrote {out_dir}/{'model.safetensors'} ({sum(t.numel() for t in c.tensors.values()):,} parameters, "
        f"{str(c.dtype).replace('torch.', '')}, vocab {c.model.vocab_size}"
        + (f", padding rows kept: {sorted(c.padding)}" if c.padding else "") + ")")
    checks = []
    if verify_logits:
        tokens = verify.fixed_tokens(c.model)
        reference = src.logits(tokens)
        result = verify.consolidated_logits(load_consolidated(out_dir), tokens)  # what is on disk
        checks.append(verify.compare(f"{src.short} vs consolidated", reference, result, c.model.vocab_size,
                                     _tol(tolerance, src.weight_dtype, c.dtype, reference=reference), log=log,
                                     raise_on_failure=False))
        meta = json.loads((out_dir / META).read_text())
        meta["verification"] = [ch.record() for ch in checks]
        (out_dir / META).write_text(json.dumps(meta, indent=1) + "\n")  # a failed check marks the result unusable
        _raise_if_failed(checks, f"{out_dir} is marked as failed in {META}")
    return checks


def _raise_if_failed(checks: list, consequence: str) -> None:
    failed = [ch for ch in checks if not ch.ok]
    if failed:
        raise VerificationError(f"{failed[0].line()}: the conversion does not compute what its source computes; "
                                f"{consequence}")


def reshard(source, out_root, *, tensor_parallel: int, pipeline_parallel: int = 1, data_parallel: int = 1,
            zero_stage: Optional[int] = None, drop_optimizer: bool = False, base_config: Optional[Path] = None,
            overrides: tuple = (), data_state: str = "auto", tag: Optional[str] = None, checksums: bool = True,
            verify_logits: bool = True, tolerance: Optional[float] = None, timeout_s: Optional[float] = None,
            log=print) -> list[verify.Check]:
    """Any source -> a training checkpoint (root directory ``out_root``) in the given layout."""
    if min(tensor_parallel, pipeline_parallel, data_parallel) < 1:
        raise ConversionError("--tp, --pp and --dp must be >= 1")
    base = _base_config(base_config)
    src = open_source(source, tag, checksums=checksums, base_config=base, log=log)
    log(f"source: {src.describe()}")
    carry = src.has_optimizer_state and not drop_optimizer  # the Adam state, resharded (checkpoint/elastic.py)
    c = src.consolidated()
    out_root = Path(out_root).resolve()
    cfg = target_config(c, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel, out_root=out_root,
                        base=base, zero_stage=zero_stage, overrides=tuple(overrides))
    world = tensor_parallel * pipeline_parallel * data_parallel
    if data_state not in ("auto", "keep", "reset"):
        raise ConversionError(f"--data-state must be auto, keep or reset, got {data_state!r}")
    states = None
    if data_state != "reset" and src.kind == "checkpoint":
        states = source_data_states(src.info, cfg, world, log=log)
    if data_state == "keep" and states is None:
        raise ConversionError("--data-state keep: the data position can only be kept from a training checkpoint "
                              "with the same data-parallel size")
    tokens = verify.fixed_tokens(c.model)
    reference = src.logits(tokens) if verify_logits else None
    meta = {"converted_from": {"path": str(src.path), "kind": src.kind, **{k: v for k, v in c.source.items()
                                                                             if k in ("step", "tensor_parallel",
                                                                                      "pipeline_parallel",
                                                                                      "zero_stage")}},
            "optimizer_state": ("carried (resharded from the source)" if carry else
                                "fresh (dropped by conversion)" if src.has_optimizer_state else "fresh")}
    extra = source_extra_state(src.info) if src.kind == "checkpoint" else {}
    path, logits, diffs = write_training_checkpoint(
        c, cfg, out_root, world_size=world, data_states=states, extra_state=extra, tokens=tokens, meta=meta,
        hub_dir=src.path if src.kind == "consolidated" else None, timeout_s=timeout_s,
        optimizer_from=src.info.path if carry else None, log=log)
    log(f"wrote {path} (resume: largelm-launch --config {path}/config.yaml --nproc {world})")
    log(f"reloaded through CheckpointManager.load: max |fp32 master - converted weight| {diffs['weight_diff']:.3e}, "
        f"max |module weight - fp32 master| {diffs['module_diff']:.3e} ({cfg.train.precision} module)")
    checks = []
    if verify_logits:
        what = (f"{src.short} vs checkpoint (TP={tensor_parallel} PP={pipeline_parallel} DP={data_parallel} "
                f"ZeRO-{cfg.parallel.zero_stage})")
        checks.append(verify.compare(what, reference, logits, c.model.vocab_size,
                                     _tol(tolerance, src.weight_dtype, c.dtype, reference=reference), log=log,
                                     raise_on_failure=False))
    weights_ok = diffs["weight_diff"] == 0.0
    ok = weights_ok and all(ch.ok for ch in checks)
    write_conversion_record(out_root, {"source": str(src.path), "checkpoint": str(path), "step": c.step,
                                       "layout": {"tensor_parallel": tensor_parallel,
                                                  "pipeline_parallel": pipeline_parallel,
                                                  "data_parallel": data_parallel,
                                                  "zero_stage": cfg.parallel.zero_stage},
                                       "optimizer_state": meta["optimizer_state"],
                                       "data_state_kept": states is not None, "weights": diffs,
                                       "verification": [ch.record() for ch in checks], "ok": ok})
    if not ok:  # leave nothing the trainer could resume from (the source is untouched; conversion.json explains)
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        (out_root / "latest").unlink(missing_ok=True)
        if not weights_ok:
            raise VerificationError(f"the written checkpoint's fp32 master weights differ from the converted weights "
                                    f"by up to {diffs['weight_diff']:.3e}; {path} was removed")
        _raise_if_failed(checks, f"{path} was removed")
    return checks


def export_hf(source, out_dir, *, dtype: Optional[str] = None, tokenizer: Optional[Path] = None,
              tag: Optional[str] = None, checksums: bool = True, verify_logits: bool = True,
              tolerance: Optional[float] = None, max_shard_size: Optional[int] = None, log=print) -> list[verify.Check]:
    """Any source -> Hugging Face directory (GPT2LMHeadModel / LlamaForCausalLM + tokenizer)."""
    src = open_source(source, tag, checksums=checksums, log=log)
    log(f"source: {src.describe()}")
    c = src.consolidated()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    out_dir = Path(out_dir)
    hf.export_hf(c, out_dir, dtype=parse_dtype(dtype) if dtype else None, tokenizer=tokenizer, log=log, **kwargs)
    out_dtype = parse_dtype(dtype) if dtype else c.dtype
    log(f"wrote {out_dir} ({hf.architecture_of(c)}, {str(out_dtype).replace('torch.', '')})")
    checks = []
    if verify_logits:
        tokens = verify.fixed_tokens(c.model)
        reference = src.logits(tokens)
        result = hf.hf_logits(out_dir, tokens)
        checks.append(verify.compare(f"{src.short} vs transformers {hf.architecture_of(c)}",
                                     reference, result, c.model.vocab_size,
                                     _tol(tolerance, src.weight_dtype, out_dtype, reference=reference), log=log,
                                     raise_on_failure=False))
        (out_dir / "largelm_conversion.json").write_text(json.dumps(
            {"source": str(src.path), "step": c.step, "verification": [ch.record() for ch in checks],
             "ok": all(ch.ok for ch in checks)}, indent=1) + "\n")
        _raise_if_failed(checks, f"see {out_dir}/largelm_conversion.json")
    return checks


def import_hf(hf_dir, out_dir, *, base_config: Optional[Path] = None, dtype: Optional[str] = None,
              verify_logits: bool = True, tolerance: Optional[float] = None, log=print) -> list[verify.Check]:
    """Hugging Face directory -> consolidated directory (then ``reshard`` it into any training layout)."""
    src = open_source(hf_dir, base_config=_base_config(base_config), log=log)
    if src.kind != "hf":
        raise ConversionError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    return consolidate(hf_dir, out_dir, dtype=dtype, verify_logits=verify_logits, tolerance=tolerance,
                       base_config=base_config, log=log)


def info(source, tag: Optional[str] = None) -> dict:
    """What a source is (no conversion, no checksums)."""
    src = open_source(source, tag, checksums=False, log=lambda *_: None)
    if src.kind == "checkpoint":
        return {"kind": "checkpoint", **checkpoint_summary(src.info)}
    if src.kind == "consolidated":
        meta = json.loads((Path(source) / META).read_text())
        return {"kind": "consolidated", **{k: meta[k] for k in ("model", "dtype", "step", "source", "verification")}}

    return {"kind": "huggingface", "config": read_hf_config(src.path).to_dict()}


__all__ = ["Source", "consolidate", "export_hf", "import_hf", "info", "reshard"]

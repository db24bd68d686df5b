"""Post-training weight-only quantization of a largelm training checkpoint (GPT or BERT), with a report.

    python tools/quantize.py --checkpoint runs/gpt-tiny/checkpoints --out runs/gpt-tiny/int4 \
        --bits 4 --group-size 32 --method gptq
    python tools/quantize.py --checkpoint runs/gpt-tiny/checkpoints --out runs/gpt-tiny/gptq-hf \
        --format hf-gptq --bits 4 --group-size 32 --method gptq --act-order

``--format hf-gptq`` writes a Hugging Face GPTQ directory (config.json with ``quantization_config``, packed
``qweight/qzeros/scales/g_idx`` in model.safetensors, tokenizer files; largelm/quant/hf_gptq.py) instead of
largelm's own format; symmetric by default there (the GPTQ convention serving kernels need).
``--bits 4|8`` with ``--group-size N`` (-1: per output channel) and ``--sym``/``--no-sym`` (``--asymmetric``) pick
the format in both outputs.
BERT checkpoints are calibrated on masked batches and measured by their masked-LM validation loss.

Reads the checkpoint (a root -> its latest, or one step_XXXXXXXX directory; any TP/PP/ZeRO layout), quantizes the
transformer linear layers (int8 per channel, or int4 group-wise; round-to-nearest, or GPTQ or AWQ on calibration
batches from the training shards), writes the quantized checkpoint (model.safetensors + quant.json + config.yaml;
load it with ``largelm.quant.load_quantized``) and ``report.md`` / ``report.json``: size on disk (bf16 export vs
quantized), validation perplexity on the config's validation shards and forward tokens/s, before and after. The
"before" model is the checkpoint's fp32 weights; both run in ``--dtype`` (fp32 default) on this machine; tokens/s
of the two are timed interleaved (best of 7 passes each), since a shared machine's load drifts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from largelm.cli import exit_now, positive_int


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint root (uses latest) or a step_XXXXXXXX directory")
    p.add_argument("--out", required=True, help="output directory of the quantized checkpoint (new, empty, or a "
                   "previous output, which is replaced)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=8)
    p.add_argument("--group-size", type=group_size_arg, default=None, help="input columns per scale/zero point; "
                   "-1: one per output channel (default: 128 for int4, -1 for int8)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric grid (zero point 2^(bits-1)) or, with --no-sym, a min/max zero point per group "
                   "(default: symmetric for int8 and for --format hf-gptq, asymmetric for largelm's int4)")
    p.add_argument("--asymmetric", dest="sym", action="store_false", default=None, help="the same as --no-sym")
    p.add_argument("--method", choices=("rtn", "gptq", "awq"), default="rtn")
    p.add_argument("--format", choices=("largelm", "hf-gptq"), default="largelm",
                   help="largelm: load_quantized's format; hf-gptq: a Hugging Face GPTQ directory")
    p.add_argument("--act-order", action="store_true", help="gptq + hf-gptq: quantize columns in order of "
                   "decreasing Hessian diagonal (GPTQ's desc_act)")
    p.add_argument("--calib-batches", type=positive_int, default=16,
                   help="gptq/awq: training batches for the Hessians / activation statistics")
    p.add_argument("--awq-grid", type=positive_int, default=20, help="awq: scale exponents tried (alpha = i / grid)")
    p.add_argument("--awq-search-tokens", type=positive_int, default=2048,
                   help="awq: sampled calibration tokens on which each layer's scale is searched")
    p.add_argument("--awq-no-clip", action="store_true", help="awq: skip the weight-clipping search")
    p.add_argument("--percdamp", type=float, default=0.01, help="gptq: Hessian damping (fraction of mean diag)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--eval-batches", type=positive_int, default=None, help="limit validation batches (default: all)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype for eval and timing")
    p.add_argument("--prompt", default="", help="also generate a greedy sample from this prompt for the report")
    return p.parse_args(argv)


def group_size_arg(text: str) -> int:
    """argparse type: -1 (per output channel) or a count >= 1."""
    return -1 if text.strip() == "-1" else positive_int(text)


def usage_error(args) -> str | None:
    """What is wrong with the combination of flags (checked before torch and the checkpoint are loaded)."""
    if args.act_order and (args.method != "gptq" or args.format != "hf-gptq"):
        return "--act-order needs --method gptq and --format hf-gptq"
    if args.method == "awq" and args.format == "hf-gptq":
        # AWQ may keep an explicit per-input-channel scale (after GELU, or with grouped-query attention), which
        # the GPTQ format has no place for; its own format (quant_method: awq) is not written here
        return "--format hf-gptq takes --method rtn or gptq (AWQ's results stay in the largelm format)"
    if args.group_size == 1 or (args.bits == 4 and args.group_size not in (None, -1) and args.group_size % 2):
        return (f"--group-size {args.group_size}: int{args.bits} needs -1 (per output channel) or "
                f"{'an even number' if args.bits == 4 else 'a number'} >= 2")
    return None


def quant_format(args):
    """The ``QuantFormat`` the flags ask for. hf-gptq: symmetric unless --no-sym, asymmetric zero points >= 1 (the
    GPTQ v1 format stores zero - 1)."""
    from largelm.quant import QuantFormat  # lazy (usage errors are reported before torch is imported)

    hf = args.format == "hf-gptq"
    group = args.group_size if args.group_size is not None else (128 if args.bits == 4 else -1)
    sym = args.sym if args.sym is not None else (True if hf else None)
    return QuantFormat(args.bits, None if group == -1 else group, sym, min_zero=1 if hf else 0)


def calibration_batches(cfg, count: int, batch_size: int):
    """``count`` training batches: GPT token tensors [b, s+1]; BERT masked sentence-pair batches (dicts)."""
    from largelm.data import build_loader
    from largelm.model.registry import get_arch

    loader = build_loader(datasets=[(s.path, s.weight) for s in cfg.data.train], seq_length=cfg.model.seq_length,
                          batch_size=batch_size, rank=0, world_size=1, num_workers=0, shuffle_buffer=256,
                          seed=cfg.data.seed, infinite=True, **get_arch(cfg.model.arch).loader_kwargs(cfg))
    it = iter(loader)
    batches = [next(it) for _ in range(count)]
    return [b["tokens"] for b in batches] if cfg.model.arch == "gpt" else batches


HF_GPTQ_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "chat_template.jinja", "report.md", "report.json"}


def write_hf_gptq(model, cfg, out: Path, fmt, act_order: bool, percdamp: float) -> Path:
    """The quantized ``model`` as a Hugging Face GPTQ directory at ``out``, atomically (written and fsynced in a
    ``.partial-*`` sibling, then renamed; an earlier export there is replaced only then)."""
    import shutil

    import torch

    from largelm.convert.hf import write_hf_dir
    from largelm.fileio import fsync_file, publish_dir
    from largelm.model.registry import get_arch
    from largelm.quant import QuantizationError
    from largelm.quant.hf_gptq import hf_gptq_tensors, quantization_config

    if out.exists() and (not out.is_dir() or not {p.name for p in out.iterdir()} <= HF_GPTQ_FILES
                         or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise QuantizationError(f"output directory {out} is not empty and not an earlier GPTQ export (it would be "
                                "replaced as a whole): choose a new or empty directory")
    tensors = hf_gptq_tensors(model, cfg, torch.float16)
    partial, replaced = out.parent / f".partial-{out.name}", out.parent / f".replaced-{out.name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (partial, replaced):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        write_hf_dir(cfg.model, get_arch(cfg.model.arch).section_args(cfg), tensors, partial, dtype=torch.float16,
                     tokenizer=Path(cfg.tokenizer.model), quantization_config=quantization_config(
                         fmt, act_order, percdamp, tensors), log=lambda _: None)
        for f in partial.iterdir():
            fsync_file(f)
        publish_dir(partial, out, replaced)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def run(args) -> dict:
    import torch

    from largelm.checkpoint.full_weights import load_full_weights
    from largelm.model.generate import generate
    from largelm.model.weights import load_full_state_dict
    from largelm.quant import (
        QuantizationError,
        build_model,
        load_quantized,
        perplexity,
        quantize_model,
        save_quantized,
        single_process_parallel_state,
    )
    from largelm.quant.bert import bert_calibration_forward, bert_tokens_per_s, mlm_perplexity
    from largelm.quant.hf_gptq import quantize_model_act_order
    from largelm.quant.model import (
        check_supported,
        compare_tokens_per_s,
        dir_bytes,
        gpt_calibration_forward,
        target_layers,
    )
    from largelm.tokenizer import Tokenizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    hf = args.format == "hf-gptq"
    # hf-gptq defaults to symmetric (zero point 2^(bits-1)): what serving kernels (Marlin, ExLlama) implement
    fmt = quant_format(args)
    out = Path(args.out)
    with single_process_parallel_state():
        cfg, state, ckpt_dir = load_full_weights(args.checkpoint)
        check_supported(cfg)
        causal = cfg.model.arch == "gpt"
        if args.prompt and not causal:
            raise QuantizationError("--prompt: a BERT checkpoint does not generate text")
        if args.method == "awq" and not causal:
            raise QuantizationError("--method awq: the scale search and folds are written for GPT layers; "
                                    "quantize a BERT checkpoint with --method rtn or gptq")
        measure = perplexity if causal else mlm_perplexity
        forward = gpt_calibration_forward if causal else bert_calibration_forward
        model = build_model(cfg, dtype)
        for name, layer in target_layers(model).items():  # a group size that does not fit fails before the slow work
            fmt.check(name, tuple(layer.weight.shape))
        load_full_state_dict(model, state)
        model.eval()
        # only generation needs it; loaded before the slow work so that a missing one fails early
        tok = Tokenizer.load(cfg.tokenizer.model) if args.prompt or hf else None
        before = measure(model, cfg, batch_size=args.batch_size, max_batches=args.eval_batches)
        reference = build_model(cfg, dtype)  # an unquantized copy, timed side by side with the quantized model
        load_full_state_dict(reference, state)
        with tempfile.TemporaryDirectory() as tmp:  # the bf16 export: the size baseline
            bf16_bytes = dir_bytes(save_quantized(model, cfg, tmp, method="none", fmt=None))
        calib = calibration_batches(cfg, args.calib_batches, args.batch_size) if args.method != "rtn" else None
        awq_options = {"n_grid": args.awq_grid, "search_tokens": args.awq_search_tokens, "clip": not args.awq_no_clip}
        awq_stats: dict = {}
        if args.act_order:
            quantize_model_act_order(model, fmt, calib, args.percdamp, forward)
        else:
            quantize_model(model, fmt, args.method, calib, args.percdamp, awq_options, awq_stats, forward=forward)
        if hf:
            write_hf_gptq(model, cfg, out, fmt, args.act_order, args.percdamp)
            qmodel = model  # the model the export holds (its dequantized weights are the export's)
        else:
            meta = {"source_checkpoint": str(ckpt_dir), "calib_batches": args.calib_batches if calib else 0}
            if awq_stats:
                meta["awq"] = {"options": awq_options, "layers": awq_stats}
            save_quantized(model, cfg, out, method=args.method, fmt=fmt, extra_meta=meta)
            del model
            qmodel, _ = load_quantized(out, dtype)  # measure what a user loads
        after = measure(qmodel, cfg, batch_size=args.batch_size, max_batches=args.eval_batches)
        timing = compare_tokens_per_s if causal else bert_tokens_per_s
        speed = timing({"before": reference, "after": qmodel}, cfg, args.batch_size)
        before["tokens_per_s"], after["tokens_per_s"] = speed["before"], speed["after"]
        sample = generate(qmodel, tok, args.prompt, 24, context=cfg.model.seq_length) if args.prompt else None
    report = {
        "checkpoint": str(ckpt_dir), "out": str(out), "format": args.format, "arch": cfg.model.arch,
        "method": args.method, "act_order": args.act_order, "bits": args.bits,
        "group_size": fmt.group_size or -1, "sym": fmt.sym, "dtype": args.dtype,
        "metric": "valid" if causal else "masked-LM valid",
        "bytes": {"bf16": bf16_bytes, "quantized": sum(f.stat().st_size for f in out.glob("*.safetensors"))},
        "before": before, "after": after,
        "ppl_increase_pct": 100.0 * (after["ppl"] / before["ppl"] - 1.0),
        "sample": {"prompt": args.prompt, "continuation": sample} if sample is not None else None,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(report_markdown(report))
    return report


def report_markdown(r: dict) -> str:
    g = f", group size {r['group_size']}" if r.get("group_size") not in (None, -1) else " (per output channel)"
    g += "" if r.get("sym") is None else (", symmetric" if r["sym"] else ", asymmetric")
    lines = [
        f"# Quantization report: int{r['bits']}{g}, {r['method'].upper()}"
        f"{' (act-order)' if r.get('act_order') else ''}, {r.get('arch', 'gpt').upper()}, format "
        f"{r.get('format', 'largelm')}", "",
        f"source `{r['checkpoint']}` -> `{r['out']}`; compute dtype {r['dtype']}; validation tokens "
        f"{r['before']['tokens']}", "",
        f"| | size on disk (bytes) | {r.get('metric', 'valid')} loss | ppl | forward tokens/s |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| before (size: bf16 export; run: original weights) | {r['bytes']['bf16']:,} | {r['before']['loss']:.4f} | "
        f"{r['before']['ppl']:.3f} | {r['before']['tokens_per_s']:,.0f} |",
        f"| after (int{r['bits']}) | {r['bytes']['quantized']:,} | {r['after']['loss']:.4f} | "
        f"{r['after']['ppl']:.3f} | "
        f"{r['after']['tokens_per_s']:,.0f} |", "",
        f"perplexity change: {r['ppl_increase_pct']:+.2f}%; size: "
        f"{r['bytes']['quantized'] / r['bytes']['bf16']:.1%} of bf16",
    ]
    if r.get("sample"):
        lines += ["", f"greedy sample from {r['sample']['prompt']!r}: {r['sample']['continuation']!r}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)  # a usage error is reported before torch and the checkpoint code are imported (seconds)
    problem = usage_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from largelm.checkpoint.manager import CheckpointError
    from largelm.config import ConfigError
    from largelm.data import DataError
    from largelm.errors import ConversionError as LargelmError  # the HF export's (tokenizer, config) errors
    from largelm.quant import QuantizationError
    from largelm.tokenizer import TokenizerError

    try:
        report = run(args)
    # DataError/TokenizerError: the checkpoint's config.yaml names data and tokenizer paths (often relative to
    # the training directory) that need not exist where this runs
    except (QuantizationError, CheckpointError, ConfigError, DataError, TokenizerError, LargelmError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report_markdown(report))
    return 0


if __name__ == "__main__":
    exit_now(main())  # files written and closed: skip the interpreter's teardown of torch (largelm.cli.exit_now)

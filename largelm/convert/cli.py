"""largelm-convert: consolidate, reshard, export to and import from Hugging Face - each conversion verified.

    largelm-convert consolidate runs/x/checkpoints out/x-consolidated            # ZeRO 0-3, any TP/PP -> one file
    largelm-convert reshard runs/x/checkpoints out/x-tp4 --tp 4                  # -> training checkpoint, TP=4
    largelm-convert export-hf runs/x/checkpoints out/x-hf                        # -> GPT2/Llama/Bert HF classes
    largelm-convert import-hf path/to/hf-model out/m --config configs/my.yaml    # -> consolidated (+ training config)
    largelm-convert reshard out/m out/m-tp2pp2 --tp 2 --pp 2                     # consolidated/HF -> any layout
    largelm-convert info runs/x/checkpoints

SOURCE may be a training checkpoint (its root, with `latest`, or a step_XXXXXXXX directory), a consolidated
directory (largelm.json) or a Hugging Face model directory (config.json). Every command compares the logits of
source and result on a fixed batch and fails (exit 3) above the tolerance: 1e-4 x max(1, max|logit|) for fp32
weights, 5e-2 x max(1, max|logit|) when bf16 weights are involved. Other errors exit 1. Conversions run on the
CPU; layouts with several ranks are spawned as local processes (gloo). See docs/checkpoint_conversion.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _common(p: argparse.ArgumentParser, tag: bool = True) -> None:
    if tag:
        p.add_argument("--tag", help="checkpoint tag (step_XXXXXXXX) under a checkpoint root; default: latest")
        p.add_argument("--no-checksums", dest="checksums", action="store_false",
                       help="check only file sizes against the checkpoint manifest, not sha256")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the logit comparison (not recommended: it is what catches a wrong conversion)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="absolute max |logit diff| allowed (default: by dtype, see --help of the main command)")
    p.add_argument("--verbose", action="store_true", help="show DeepSpeed/megatron output of spawned ranks")


def _weights_out(p: argparse.ArgumentParser, dtype_help: str, tokenizer_help: str) -> None:
    """SOURCE OUT --dtype --tokenizer: the commands that write weights and a tokenizer to a directory."""
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help=dtype_help)
    p.add_argument("--tokenizer", type=Path, default=None, help=tokenizer_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="largelm-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("consolidate", help="training checkpoint (or any source) -> consolidated safetensors",
                       description="Merge ZeRO partitions (DeepSpeed's zero_to_fp32 merge), unshard TP/PP and write "
                                   "model.safetensors + largelm.json (+ tokenizer.model) to OUT.")
    _weights_out(p, "output dtype (default: the source's)",
                 "sentencepiece .model to keep with it (default: the one in the checkpoint's config)")
    _common(p)

    p = sub.add_parser("reshard", help="any source -> training checkpoint in another TP/PP/DP layout",
                       description="Write a training checkpoint (DeepSpeed's own files, written by a real engine of "
                                   "the target layout in spawned ranks) that `largelm-launch` resumes.")
    p.add_argument("source")
    p.add_argument("out", help="new checkpoint root (must not hold checkpoints)")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size (world size = tp x pp x dp)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                   help="ZeRO stage of the new checkpoint (default: the source config's)")
    p.add_argument("--drop-optimizer", action="store_true",
                   help="start a fresh optimizer (Adam moments zero) instead of carrying the source checkpoint's "
                        "(default: fp32 masters, Adam moments and step, LR schedule carried exactly)")
    p.add_argument("--config", type=Path, default=None,
                   help="training config to use (needed for consolidated/HF sources without one); its model shape "
                        "is replaced by the weights'")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a field of the new checkpoint's config (repeatable), e.g. --set train.steps=2000")
    p.add_argument("--data-state", choices=["auto", "keep", "reset"], default="auto",
                   help="keep the per-rank data position (same DP size only) or restart the data (auto: keep if "
                        "possible)")
    _common(p)

    p = sub.add_parser("export-hf", help="any source -> Hugging Face transformers directory",
                       description="GPT-2 style -> GPT2LMHeadModel, Llama style -> LlamaForCausalLM, BERT -> "
                                   "BertForPreTraining/BertForMaskedLM (bert.residual_post_layernorm: true) or "
                                   "MegatronBertForPreTraining/MegatronBertForMaskedLM (pre-LN), with config.json, "
                                   "safetensors and a tokenizer.json converted from the sentencepiece model, loadable "
                                   "offline with AutoModelForCausalLM / AutoModelForMaskedLM and AutoTokenizer.")
    _weights_out(p, "weights dtype (default: the source's)",
                 "sentencepiece .model (default: the one recorded with the source)")
    p.add_argument("--max-shard-size", type=int, default=None, help="bytes per safetensors shard (default 5 GiB)")
    _common(p)

    p = sub.add_parser("import-hf", help="Hugging Face directory -> consolidated (then reshard to any layout)")
    p.add_argument("source")
    p.add_argument("out")
    p.add_argument("--config", type=Path, default=None,
                   help="training config to attach (tokenizer, data, optimizer...); model shape from the HF config")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    _common(p, tag=False)

    p = sub.add_parser("info", help="describe a checkpoint / consolidated / HF directory")
    p.add_argument("source")
    p.add_argument("--tag", default=None)
    return parser


def _quiet(hf: bool = True) -> None:
    """Keep the output to our report lines: no CPU-accelerator notice, no library warnings. ``hf``: the command
    will use transformers."""
    import warnings

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import logging

    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "torch.utils._pytree", "torchao"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not hf:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    import importlib.util

    if importlib.util.find_spec("torchao") is not None:  # transformers imports it later; it warns about CUDA-only
        importlib.import_module("torchao")  # kernels at import time, so import it now, while its logger is quiet


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _quiet(hf=args.command in ("export-hf", "import-hf") or (Path(args.source) / "config.json").is_file())
    if getattr(args, "verbose", False):
        os.environ["LARGELM_CONVERT_VERBOSE"] = "1"
    from largelm.convert import api  # lazy: after the quiet environment is set
    from largelm.errors import ConversionError, VerificationError  # lazy: after the quiet environment is set

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        if args.command == "consolidate":
            api.consolidate(args.source, args.out, tag=args.tag, dtype=args.dtype, checksums=args.checksums,
                            verify_logits=args.verify, tolerance=args.tolerance, tokenizer=args.tokenizer, log=log)
        elif args.command == "reshard":
            api.reshard(args.source, args.out, tensor_parallel=args.tp, pipeline_parallel=args.pp,
                        data_parallel=args.dp, zero_stage=args.zero_stage, drop_optimizer=args.drop_optimizer,
                        base_config=args.config, overrides=tuple(args.overrides), data_state=args.data_state,
                        tag=args.tag, checksums=args.checksums, verify_logits=args.verify, tolerance=args.tolerance,
                        log=log)
        elif args.command == "export-hf":
            api.export_hf(args.source, args.out, dtype=args.dtype, tokenizer=args.tokenizer, tag=args.tag,
                          checksums=args.checksums, verify_logits=args.verify, tolerance=args.tolerance,
                          max_shard_size=args.max_shard_size, log=log)
        elif args.command == "import-hf":
            api.import_hf(args.source, args.out, base_config=args.config, dtype=args.dtype,
                          verify_logits=args.verify, tolerance=args.tolerance, log=log)
        elif args.command == "info":
            print(json.dumps(api.info(args.source, args.tag), indent=1, default=str))
    except VerificationError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 3
    except (ConversionError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

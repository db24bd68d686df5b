"""largelm-eval: lm-evaluation-harness on a largelm checkpoint of any layout, through largelm's own model.

    largelm-eval --make-tasks --corpus data/default/corpus/corpus.jsonl --task-dir data/default/eval_tasks
    largelm-eval --checkpoint runs/gpt-tiny/checkpoints --tasks largelm_next_line,largelm_perplexity --limit 100

--make-tasks writes the bundled task set (largelm_next_line, largelm_last_word, largelm_perplexity,
largelm_next_line_gen; tag largelm_heldout) from the corpus's held-out documents: the same split as
largelm-prepare-data --valid-fraction (0.01 in the quickstart). Evaluation loads the checkpoint (a training
checkpoint's root or step directory, any TP/PP/ZeRO layout; a consolidated or Hugging Face directory) into one
fp32 model on the CPU, runs the tasks found under --task-dir (no dataset hub is contacted), prints lm-eval's
table and writes lm-eval's results JSON atomically next to the checkpoint (or to --output): for a training
checkpoint <root>/lm_eval_step_XXXXXXXX.json, for a directory D, D.lm_eval.json beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lm_eval.utils import handle_non_serializable, make_table

from largelm.checkpoint.manager import CheckpointError
from largelm.cli import positive_int
from largelm.config import EVAL_TASK_TAG
from largelm.errors import ConversionError
from largelm.evaluate.model import single_rank
from largelm.fileio import write_text_atomic
from largelm.generation.load import load_causal_lm
from largelm.model.harness import LargelmLM, run_harness
from largelm.prepare.eval_tasks import make_eval_tasks

DEFAULT_TASK_DIR = "data/default/eval_tasks"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="largelm-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="training checkpoint root or step dir, consolidated or Hugging Face dir")
    p.add_argument("--tasks", default=EVAL_TASK_TAG, help=f"comma-separated task names (default: {EVAL_TASK_TAG}, "
                   "all bundled tasks)")
    p.add_argument("--limit", type=positive_int, default=None, help="documents per task (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--output", type=Path, default=None, help="results JSON (default: next to the checkpoint)")
    p.add_argument("--task-dir", type=Path, default=Path(DEFAULT_TASK_DIR), help="lm-eval task YAMLs")
    p.add_argument("--tokenizer", type=Path, default=None, help="sentencepiece model (default: the checkpoint's)")
    p.add_argument("--bootstrap-iters", type=int, default=1000,
                   help="bootstrap resamples for the stderr of non-mean metrics (0: none)")
    p.add_argument("--log-samples", action="store_true", help="keep per-document results in the JSON")
    g = p.add_argument_group("writing the bundled task set")
    g.add_argument("--make-tasks", action="store_true", help="write the task set into --task-dir and exit")
    g.add_argument("--corpus", nargs="+", default=["data/default/corpus/corpus.jsonl"],
                   help=".jsonl/.txt documents (default: the quickstart corpus)")
    g.add_argument("--valid-fraction", type=float, default=0.01,
                   help="held-out fraction, as given to largelm-prepare-data (default 0.01)")
    g.add_argument("--seed", type=int, default=1234)
    return p


def default_output(loaded) -> Path:
    """Beside the checkpoint, never inside it (a training checkpoint's files are listed in its manifest)."""
    if loaded.kind == "checkpoint":
        return loaded.path.parent / f"lm_eval_{loaded.path.name}.json"
    return loaded.path.parent / f"{loaded.path.resolve().name}.lm_eval.json"


def results_json(results: dict) -> str:
    return json.dumps(results, indent=1, default=handle_non_serializable, ensure_ascii=False) + "\n"


def evaluate(args: argparse.Namespace, log=print) -> tuple[dict, Path]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks names no task")
    with single_rank():
        loaded = load_causal_lm(args.checkpoint, tokenizer=args.tokenizer, log=log)
        cfg = loaded.model
        log(f"model: {loaded.kind} {loaded.path} ({cfg.arch}/{cfg.style}, {cfg.num_layers} layers, hidden "
            f"{cfg.hidden_size}, vocab {cfg.vocab_size}, context {cfg.seq_length})")
        lm = LargelmLM(loaded.module, loaded.tokenizer, max_length=cfg.seq_length, batch_size=args.batch_size)
        results = run_harness(lm, tasks, args.task_dir, limit=args.limit, log_samples=args.log_samples,
                              bootstrap_iters=args.bootstrap_iters)
    results["largelm"] = {"checkpoint": str(loaded.path), "kind": loaded.kind, "step": loaded.step,
                          "task_dir": str(args.task_dir), "tasks": tasks, "limit": args.limit}
    out = args.output or default_output(loaded)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, results_json(results))
    return results, out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.make_tasks:
            sizes = make_eval_tasks(args.corpus, args.task_dir, valid_fraction=args.valid_fraction, seed=args.seed)
            for name, count in sizes.items():
                print(f"{name}: {count} documents")
            print(f"wrote {args.task_dir} (tasks tagged {EVAL_TASK_TAG})")
            return 0
        if not args.checkpoint:
            print("largelm-eval: error: --checkpoint is required (or --make-tasks)", file=sys.stderr)
            return 2
        results, out = evaluate(args)
    except (ConversionError, CheckpointError, ValueError, OSError) as err:
        print(f"largelm-eval: error: {err}", file=sys.stderr)
        return 1
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Knowledge distillation: train the config's (student) model against a frozen teacher checkpoint.

    python tools/distill.py --config configs/gpt-tiny.yaml --teacher runs/gpt-big/checkpoints \
        --alpha 0.5 --temperature 2 --student-init every_kth_layer --k 2 --nproc 2 -- model.num_layers=2
    python tools/distill.py --config configs/bert-tiny.yaml --teacher runs/bert-tiny/checkpoints \
        --student-init every_kth_layer --k 2 --hidden-weight 1 --attention-weight 1 -- model.num_layers=2

BERT (masked LM + SOP/NSP): the KL is taken on the masked positions, the hard loss is the MLM (+ pair) loss, and
``--hidden-weight`` / ``--attention-weight`` add hidden-state / attention-map alignment over ``--layer-map``
(largelm/train/distill_bert.py); ``--hidden-projection`` learns TinyBERT's W_h for a student of another hidden
size.

A thin wrapper over ``largelm-launch``: it adds the ``distill`` config section as overrides (``distill.teacher=...``
etc.; a config may also carry the section itself) and launches the same training path (DeepSpeed engine, launcher,
checkpoints, tensorboard with ``distill/kl`` and ``distill/lm_loss``). Everything after ``--`` is passed on as
config overrides; launcher options not listed here can be given with ``--launch-arg=--hostfile=...``.
"""

from __future__ import annotations

import argparse
import sys

from largelm.cli import positive_int


def build_argv(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the student's training config")
    p.add_argument("--teacher", required=True, help="teacher checkpoint root (its latest) or step_XXXXXXXX dir")
    p.add_argument("--alpha", type=float, default=None, help="weight of the KL term (default 0.5)")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature T (default 2)")
    p.add_argument("--student-init", choices=("random", "every_kth_layer"), default=None)
    p.add_argument("--k", type=positive_int, default=None, help="every_kth_layer: student layer i <- teacher layer i*k")
    p.add_argument("--teacher-precision", choices=("fp32", "bf16"), default=None)
    p.add_argument("--hidden-weight", type=float, default=None, help="BERT: weight of the hidden-state alignment")
    p.add_argument("--hidden-loss", choices=("cosine", "mse", "cosine+mse"), default=None)
    p.add_argument("--hidden-projection", action="store_true", default=None,
                   help="BERT: align hidden states through a learned projection student -> teacher hidden size "
                        "(TinyBERT's W_h; needed when they differ)")
    p.add_argument("--attention-weight", type=float, default=None, help="BERT: weight of the attention-map alignment")
    p.add_argument("--layer-map", default=None,
                   help="BERT: every_kth_layer, or [student, teacher] pairs of 0-based layers, e.g. '[[0,1],[1,3]]'")
    p.add_argument("--nproc", type=positive_int, default=1)
    p.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed")
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--launch-arg", action="append", default=[], help="extra largelm-launch argument (repeatable)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=200 model.num_layers=2")
    args = p.parse_args(argv)
    distill = {"teacher": args.teacher, "alpha": args.alpha, "temperature": args.temperature,
               "student_init": args.student_init, "k": args.k, "teacher_precision": args.teacher_precision,
               "hidden_weight": args.hidden_weight, "hidden_loss": args.hidden_loss,
               "hidden_projection": args.hidden_projection,
               "attention_weight": args.attention_weight, "layer_map": args.layer_map}
    overrides = [f"distill.{key}={value}" for key, value in distill.items() if value is not None]
    cmd = ["--config", args.config, "--nproc", str(args.nproc), "--launcher", args.launcher, *args.launch_arg]
    if args.master_port:
        cmd += ["--master-port", str(args.master_port)]
    return cmd + ["--", *overrides, *args.overrides]


def main(argv=None) -> int:
    from largelm.launch import main as launch_main

    return launch_main(build_argv(argv), replace_process=argv is None)  # as a program: become the launcher


if __name__ == "__main__":
    sys.exit(main())

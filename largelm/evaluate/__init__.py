"""lm-evaluation-harness on largelm checkpoints: ``largelm-eval`` (cli.py), the checkpoint-loading lm-eval model
registered as ``largelm`` (model.py). The adapter itself is largelm/model/harness.py (the trainer uses it too);
the bundled held-out task set is written by largelm/prepare/eval_tasks.py."""

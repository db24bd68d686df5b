"""lm-eval's own command line, with largelm's checkpoint model registered as ``largelm``:

    python -m largelm.evaluate.lm_eval_cli --model largelm --model_args checkpoint=runs/gpt-tiny/checkpoints \
        --tasks largelm_next_line --include_path data/default/eval_tasks --limit 100

Every lm-eval option works as with ``lm_eval`` (``--batch_size`` too); model_args: ``checkpoint`` (any layout),
``tokenizer``, ``max_length``.
"""

from lm_eval.__main__ import cli_evaluate

import largelm.evaluate.model  # noqa: F401 - registers the "largelm" model with lm-eval
from largelm.model.harness import offline_hub

if __name__ == "__main__":
    offline_hub()
    cli_evaluate()

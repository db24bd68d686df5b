"""One typed config for a whole run, loaded from YAML and validated before any process group starts.

    distill.py  the ``distill:`` section (knowledge distillation)
    schema.py   the sections (pydantic, ``extra="forbid"``) and ``Config`` with the cross-field rules
    loading.py  YAML + overrides -> ``Config``; checkpoint configs; ``dump_config``

The DeepSpeed JSON config is *generated* from this object (``largelm.parallel.deepspeed_config``); it is never kept
by hand in a second place.
"""

from largelm.config.eval import BUNDLED_EVAL_TASKS, EVAL_TASK_TAG, EvalConfig, task_names_in
from largelm.config.loading import (
    CHECKPOINT_LEGACY_DEFAULTS,
    apply_override,
    checkpoint_config_from_dict,
    config_from_dict,
    dump_config,
    load_config,
)
from largelm.config.moe import MoEConfig, RouterConfig
from largelm.config.schema import (
    BertConfig,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DatasetSpec,
    DistillConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TokenizerConfig,
    TrainConfig,
    WandbConfig,
)

__all__ = [
    "BUNDLED_EVAL_TASKS", "EVAL_TASK_TAG", "EvalConfig", "task_names_in",
    "CHECKPOINT_LEGACY_DEFAULTS", "BertConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
    "DatasetSpec", "DistillConfig", "LoggingConfig", "ModelConfig", "MoEConfig", "OptimizerConfig", "ParallelConfig",
    "RouterConfig", "TokenizerConfig", "TrainConfig", "WandbConfig", "apply_override", "checkpoint_config_from_dict",
    "config_from_dict", "dump_config", "load_config",
]

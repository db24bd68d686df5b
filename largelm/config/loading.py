"""Reading a config: YAML (bounded, safe) plus dotted overrides -> a validated ``Config``; errors name the file
and the field. Checkpoint configs are read with the defaults of the fields added since they were written."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml
from pydantic import ValidationError

from largelm.config.schema import Config, ConfigError
from largelm.fileio import YAMLError, parse_yaml, read_yaml


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        got = repr(e.get("input"))  # at most 200 characters of it: an error names a value, it does not reprint it
        got = got if len(got) <= 200 else f"{got[:200]}... ({len(got):,} characters)"
        show_input = e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict)
        lines.append(f"  {loc}: {msg}" + (f" (got {got})" if show_input else ""))
    return "\n".join(lines)


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


# Fields added after checkpoints were already being written, with the value that describes those older runs.
CHECKPOINT_LEGACY_DEFAULTS = {("parallel", "single_replica_zero"): "as_configured",
                              ("train", "precision"): "bf16"}  # the default before ``auto``


def checkpoint_config_from_dict(data: dict, source: str = "<checkpoint config>") -> Config:
    """The config a checkpoint was written with (its config.yaml). A field added since takes the value that
    describes how such an older run behaved, not today's default (``CHECKPOINT_LEGACY_DEFAULTS``): checkpoints
    from before ``parallel.single_replica_zero`` existed ran the configured ZeRO stage. ``train.precision`` is
    what the run computed in (the trainer saves ``auto`` resolved): ``auto`` here cannot say which, so it is refused."""
    if isinstance(data, dict):
        data = dict(data)
        for (section, field), value in CHECKPOINT_LEGACY_DEFAULTS.items():
            values = data.get(section) or {}
            if isinstance(values, dict) and field not in values:
                data[section] = {**values, field: value}
        # The in-training evaluation schedule says nothing about the weights, and its task_dir (whose YAMLs
        # validate the task names) may be gone where the checkpoint is read later.
        data.pop("eval", None)
    cfg = config_from_dict(data, source=source)
    if cfg.train.precision == "auto":
        raise ConfigError(f"{source}: train.precision is 'auto', which does not say what the checkpoint was trained "
                          "in (the trainer records fp32 or bf16); set it to the precision the run used")
    return cfg


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> Config:
    """Load and validate a YAML config. ``overrides`` are ``dotted.key=value`` strings (YAML-typed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = read_yaml(path)  # safe loader (no Python objects), alias bombs refused
    except YAMLError as err:
        raise ConfigError(f"config file {err}") from None
    for item in overrides or []:
        apply_override(data, item, source=str(path))
    return config_from_dict(data, source=str(path))


def apply_override(data: dict, item: str, source: str = "<override>") -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    if not isinstance(data, dict):  # e.g. an empty config file: there is no section to put the value in
        found = "it is empty" if data is None else f"its top level is a {type(data).__name__}"
        raise ConfigError(f"override {item!r}: {source} does not hold a mapping of sections ({found})")
    key, raw = item.split("=", 1)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an optional section left empty (``wandb: null``): start it
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section in {source}")
    try:
        node[parts[-1]] = parse_yaml(raw, f"the value {raw!r}")
    except YAMLError as err:
        raise ConfigError(f"override {item!r}: {err}") from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

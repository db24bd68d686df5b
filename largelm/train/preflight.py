"""Checks that need no process group: run on every rank before ``init_distributed`` so a bad run fails fast."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from largelm.checkpoint.layout_change import RESHARD_SETTING, layout_change
from largelm.checkpoint.manager import CheckpointError, find_latest
from largelm.checkpoint.manager import read_manifest as read_checkpoint_manifest
from largelm.config import Config, ConfigError, ModelConfig, checkpoint_config_from_dict, task_names_in
from largelm.data import DataError, read_manifest, remote_settings
from largelm.data.remote import as_location
from largelm.data.shards import check_shard_files
from largelm.fileio import YAMLError, read_yaml
from largelm.hardware import PRECISIONS, PrecisionChoice, choose_precision, detect_device
from largelm.parallel.deepspeed_config import engine_zero_stage
from largelm.tokenizer import BERT_SPECIAL_PIECES, Tokenizer, TokenizerError
from largelm.train.teacher import preflight_teacher


def preflight(cfg: Config, world_size: int) -> Config:
    """Every check that needs no process group; returns the *resolved* config the run uses.

    Resolved: ``model.vocab_size`` from the tokenizer when unset, ``train.precision`` from ``auto`` to what this
    device computes in (a resume under ``auto`` keeps its checkpoint's precision), with the reason kept for rank 0's
    log (``precision_choice``). ``cfg`` itself is not changed.
    """
    cfg.check_world_size(world_size)
    _check_pipeline_schedule(cfg)
    tokenizer_path = Path(cfg.tokenizer.model)
    tok = _load_tokenizer(tokenizer_path)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of "
                          f"tokenizer {tokenizer_path} ({tok.vocab_size})")
    if cfg.model.arch == "bert":
        _check_bert_tokenizer(tok)
    for section, specs in (("data.train", cfg.data.train), ("data.valid", cfg.data.valid)):
        for i, spec in enumerate(specs):
            _check_dataset(f"{section}[{i}]", as_location(spec.path), cfg, tok)
    found = _saved_checkpoint(cfg)
    resolved = _resolved(cfg, vocab_size=cfg.model.vocab_size or tok.vocab_size,
                         precision=_choose_precision(cfg, found[1] if found else None))
    _check_checkpoint(resolved, world_size, found)
    if resolved.distill is not None:  # the teacher checkpoint exists and fits the student
        preflight_teacher(resolved)
    if resolved.eval is not None:
        _check_eval_tasks(resolved)
    return resolved


def _check_eval_tasks(cfg: Config) -> None:
    """The tasks of ``eval.tasks`` are defined by YAMLs under ``eval.task_dir`` (the bundled names are known to the
    config, but their files must have been written): refused now, not at the first evaluation."""
    task_dir = Path(cfg.eval.task_dir)
    if not task_dir.is_dir():
        raise ConfigError(f"eval.task_dir={cfg.eval.task_dir!r} does not exist (write the bundled tasks with "
                          f"largelm-eval --make-tasks --task-dir {cfg.eval.task_dir})")
    missing = [t for t in cfg.eval.tasks if t not in task_names_in(task_dir)]
    if missing:
        raise ConfigError(f"eval.tasks: task {missing[0]!r} is not defined by a YAML under "
                          f"eval.task_dir={cfg.eval.task_dir!r}")


def _resolved(cfg: Config, vocab_size: int, precision: PrecisionChoice) -> Config:
    """A copy of ``cfg`` with the values preflight resolved (the sections it changes are copies too)."""
    train = cfg.train.model_copy(update={"precision": precision.precision})
    train._precision_choice = precision  # private: not dumped; the checkpoint records the precision itself
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": vocab_size}), "train": train})


def _check_pipeline_schedule(cfg: Config) -> None:
    p = cfg.parallel
    if p.virtual_pipeline not in (None, 1):
        raise ConfigError("parallel.virtual_pipeline: the interleaved schedule is not supported by DeepSpeed's "
                          "pipeline engine, which drives pipeline parallelism here (see docs/design.md)")
    if p.pipeline_parallel > 1 and p.zero_stage == 0:
        # Under DeepSpeed's pipeline engine, ZeRO-0 in fp32 clips with a norm that counts replicated parameters
        # (norms, biases) only on pipeline stage 0 and reports no norm at all (measured; see docs/design.md
        # "Parallelism"). ZeRO-1 is exact (tests/test_parallel_parity.py) and without data parallelism costs
        # nothing extra, so it is the one pipeline path we run and test.
        raise ConfigError(f"parallel.zero_stage=0 with parallel.pipeline_parallel={p.pipeline_parallel}: "
                          "pipeline parallelism runs with zero_stage 1 here (DeepSpeed's pipeline engine allows "
                          "only 0 or 1, and its stage-0 gradient norm is wrong across pipeline stages)")


def _load_tokenizer(path: Path):
    """The tokenizer ``tokenizer.model`` names; a missing, directory or non-sentencepiece file is a ConfigError."""
    if not path.exists():
        raise ConfigError(f"tokenizer.model: file {path} does not exist (train one with tools/train_tokenizer.py)")
    try:
        return Tokenizer.load(path)
    except TokenizerError as err:
        raise ConfigError(f"tokenizer.model: {err}") from None


def _check_dataset(field: str, path, cfg: Config, tok) -> None:
    """``path``: a split directory or a remote prefix (its manifest fetched and shard sizes looked up here)."""
    try:
        manifest = read_manifest(path, remote_settings(cfg.data))
    except DataError as err:
        raise ConfigError(f"{field}.path: {err}") from None
    if manifest.seq_length != cfg.model.seq_length:
        raise ConfigError(f"{field}: shards in {path} hold samples of seq_length {manifest.seq_length}, "
                          f"but model.seq_length is {cfg.model.seq_length}")
    want = "bert_pairs" if cfg.model.arch == "bert" else "tokens"
    if manifest.kind != want:
        tool = "tools/prepare_bert_data.py" if want == "bert_pairs" else "tools/prepare_data.py"
        raise ConfigError(f"{field}: shards in {path} hold {manifest.kind!r} samples, model.arch={cfg.model.arch!r} "
                          f"needs {want!r} (write them with {tool})")
    if want == "bert_pairs" and manifest.pair_objective != cfg.bert.objective:
        raise ConfigError(f"{field}: shards in {path} were written for the {manifest.pair_objective!r} pair objective, "
                          f"but bert.objective is {cfg.bert.objective!r} (rewrite them with --objective "
                          f"{cfg.bert.objective})")
    sha = manifest.tokenizer_sha256
    if sha and sha != tok.sha256:
        raise ConfigError(f"{field}: shards in {path} were tokenized with another tokenizer than "
                          f"tokenizer.model={cfg.tokenizer.model} (sha256 {sha[:12]} vs {tok.sha256[:12]})")
    try:  # a missing or truncated shard fails here, not hours into the run (sha256 is checked when read)
        check_shard_files(manifest, path, remote_settings(cfg.data))
    except DataError as err:
        raise ConfigError(f"{field}: {err}") from None


def _saved_checkpoint(cfg: Config):
    """(the checkpoint resume will load, its saved config as a dict) or None: no resume, no checkpoint, or one not
    written by the trainer (which always saves config.yaml)."""
    if not cfg.checkpoint.resume:
        return None

    root = Path(cfg.checkpoint.dir)
    try:  # the checkpoint the resume will load: ``latest``, or the newest complete one if that one is damaged
        latest = find_latest(root, checksums=False)  # sizes only here; the trainer verifies the sha256 too
    except CheckpointError as err:
        raise ConfigError(f"checkpoint.dir: {err}") from None
    if latest is None or not (latest.path / "config.yaml").is_file():
        return None
    return latest, _read_saved_config(latest.path / "config.yaml")


def _choose_precision(cfg: Config, saved: Optional[dict]) -> PrecisionChoice:
    """What ``train.precision`` resolves to on this device (``auto``: a resume keeps its checkpoint's precision)."""
    train = (saved or {}).get("train")
    was = train.get("precision") if isinstance(train, dict) else None
    return choose_precision(cfg.train.precision, detect_device(), was if was in PRECISIONS else None)


def precision_choice(cfg: Config) -> Optional[PrecisionChoice]:
    """The decision preflight made for ``cfg`` (None: ``cfg`` did not pass through preflight)."""
    return cfg.train._precision_choice


_LOOK_UP = object()  # _check_checkpoint's ``found`` when the caller has not looked the checkpoint up


def _check_checkpoint(cfg: Config, world_size: int, found=_LOOK_UP) -> None:
    """A checkpoint of another model shape is refused before any step runs; one of another parallel layout unless
    ``checkpoint.reshard_on_resume`` (the trainer then reshards it, largelm/checkpoint/elastic.py). ``found``: what
    ``_saved_checkpoint(cfg)`` returned (None: nothing to resume), looked up here when not given."""
    if found is _LOOK_UP:
        found = _saved_checkpoint(cfg)
    if found is None:
        return

    latest, saved = found
    saved_cfg = latest.path / "config.yaml"
    mismatches = [
        f"model.{key}: checkpoint {saved['model'].get(key)!r} vs config {getattr(cfg.model, key)!r}"
        for key in ModelConfig.SHAPE_FIELDS if saved["model"].get(key) != getattr(cfg.model, key)
    ]
    saved_bert, bert = saved.get("bert") or {}, cfg.model_dump().get("bert") or {}
    # the binary head is a parameter set; the residual placement renames the layer norms
    for key, default in (("binary_head", True), ("residual_post_layernorm", False)):
        if bert and saved_bert.get(key, default) != bert.get(key):
            mismatches.append(f"bert.{key}: checkpoint {saved_bert.get(key, default)!r} vs config {bert.get(key)!r}")
    saved_moe, moe = saved["model"].get("moe"), cfg.model.model_dump().get("moe")
    if saved_moe != moe:  # experts, their sizes and routing: the parameter set and what it computes
        mismatches.append(f"model.moe: checkpoint {saved_moe!r} vs config {moe!r}")
    if mismatches:  # the model itself differs: no layout change can resume it
        raise ConfigError(f"checkpoint {saved_cfg.parent} does not match this config (the model shape differs; "
                          "a resume may change the parallel layout, not the model):\n  " + "\n  ".join(mismatches))
    saved_world = read_checkpoint_manifest(latest.path).get("world_size")  # find_latest has read it: valid JSON
    if saved_world is None:
        raise ConfigError(f"checkpoint {saved_cfg.parent}: its manifest records no world_size, so its layout cannot "
                          "be checked against this run")
    written = checkpoint_config_from_dict(saved, source=str(saved_cfg))
    change = layout_change(written, saved_world, cfg, world_size)
    if change is None:
        return
    if saved["model"].get("seq_length") != cfg.model.seq_length:
        raise ConfigError(f"checkpoint {saved_cfg.parent}: model.seq_length: checkpoint "
                          f"{saved['model'].get('seq_length')!r} vs config {cfg.model.seq_length!r}; a resume in "
                          f"another parallel layout keeps the model and its sequence length:\n  {change}")
    if not cfg.checkpoint.reshard_on_resume:
        raise ConfigError(f"checkpoint {saved_cfg.parent} was written in another parallel layout:\n  {change}\n"
                          f"resume it resharded with {RESHARD_SETTING} (a CLI override; or set "
                          "checkpoint.reshard_on_resume: true in the config), or run in the checkpoint's layout"
                          + _same_layout_hint(written, saved_world, cfg, world_size))


def _same_layout_hint(written: Config, saved_world: int, cfg: Config, world_size: int) -> str:
    """When only the ZeRO stage DeepSpeed runs differs (same sizes and configured stage), the setting that makes
    this run the checkpoint's layout again, so it resumes on the exact path."""
    p, q = written.parallel, cfg.parallel
    same_sizes = (saved_world == world_size and p.zero_stage == q.zero_stage
                  and (p.tensor_parallel, p.pipeline_parallel) == (q.tensor_parallel, q.pipeline_parallel))
    was, now = engine_zero_stage(written, saved_world), engine_zero_stage(cfg, world_size)
    if not same_sizes or was == now:
        return ""
    if written.train.precision != cfg.train.precision:
        # one replica: bf16 runs ZeRO-1's BF16_Optimizer, fp32 ZeRO-0 (engine_zero_stage)
        return (f"\n  train.precision: the checkpoint was trained in {written.train.precision} (DeepSpeed ran ZeRO-"
                f"{was}), this run is {cfg.train.precision} (ZeRO-{now}): or resume with "
                f"train.precision={written.train.precision}")
    return (f"\n  parallel.single_replica_zero: the checkpoint's engine ran ZeRO-{was}, this config's runs "
            f"ZeRO-{now}: or set it to {p.single_replica_zero!r}")


def _read_saved_config(path: Path) -> dict:
    """A checkpoint's config.yaml as a dict with ``model`` and ``parallel`` sections, else a ConfigError."""
    try:
        saved = read_yaml(path)
    except YAMLError as err:
        raise ConfigError(f"checkpoint config {err}; so it cannot be checked against this config") from None
    if not isinstance(saved, dict) or not all(isinstance(saved.get(key), dict) for key in ("model", "parallel")):
        raise ConfigError(f"checkpoint config {path} has no model and parallel sections, so it cannot be checked "
                          "against this config")
    return saved


def _check_bert_tokenizer(tok) -> None:
    """BERT needs [CLS], [SEP] and [MASK] as single pieces (user-defined symbols) of the tokenizer."""
    missing = []
    for piece in BERT_SPECIAL_PIECES:
        try:
            tok.token_id(piece)
        except TokenizerError:
            missing.append(piece)
    if missing:
        raise ConfigError(f"tokenizer.model: {tok.path} lacks {' '.join(missing)}, which model.arch='bert' needs "
                          "(train the tokenizer with --special-tokens [CLS] [SEP] [MASK], the default)")

"""The distillation teacher: checks that its checkpoint fits the student (run by preflight, before any process
group, so it imports no model code) and loading one TP rank's shard of its weights."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from largelm.checkpoint.full_weights import checkpoint_config, load_tp_shard_weights, resolve_checkpoint
from largelm.checkpoint.manager import MANIFEST, CheckpointError, read_manifest
from largelm.config import Config, ConfigError
from largelm.errors import ConversionError
from largelm.fileio import sha256_file
from largelm.model.layout import check_tensor_parallel

_LAYER_PREFIX = "decoder.layers."


def teacher_tp_shard(cfg: Config, tp_rank: int, padded_vocab: int,
                     keep: Optional[Callable[[str], bool]] = None) -> tuple[Config, dict, list[int]]:
    """The teacher's config, TP rank ``tp_rank``'s shard of its weights at the run's ``parallel.tensor_parallel``
    (vocabulary tensors cut from ``padded_vocab`` rows) and the teacher checkpoint's TP ranks read for it: any
    layout the teacher was trained in, without reading the whole teacher (unless it was trained at TP=1).
    ``keep``: only the weights whose (``GPTModel``) names it accepts, e.g. one pipeline stage's."""
    teacher_cfg, shard, path, sources = load_tp_shard_weights(cfg.distill.teacher, tp_rank,
                                                              cfg.parallel.tensor_parallel, padded_vocab, keep=keep)
    check_teacher(cfg, teacher_cfg, path)
    return teacher_cfg, shard, sources


def preflight_teacher(cfg: Config) -> None:
    """Before any process group: the teacher checkpoint resolves, has a config, and fits the student."""
    teacher_config(cfg)


def teacher_config(cfg: Config) -> Config:
    """The teacher checkpoint's config (reading no weights), checked against the student's."""
    try:
        path = resolve_checkpoint(cfg.distill.teacher)
        teacher_cfg = checkpoint_config(path)
    except CheckpointError as err:
        raise ConfigError(f"distill.teacher: {err}") from None
    check_teacher(cfg, teacher_cfg, path)
    return teacher_cfg


def check_teacher(cfg: Config, teacher_cfg: Config, path: Path) -> None:
    """The teacher must read the same token ids and cover the student's sequence length."""
    if teacher_cfg.model.arch != cfg.model.arch:
        raise ConfigError(f"distill.teacher: {path} is a model.arch={teacher_cfg.model.arch!r} checkpoint, the "
                          f"student is model.arch={cfg.model.arch!r}: teacher and student must be the same "
                          "architecture")
    if teacher_cfg.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"distill.teacher: {path} has vocab_size {teacher_cfg.model.vocab_size}, the student "
                          f"{cfg.model.vocab_size}: teacher and student must share the tokenizer")
    _check_teacher_tokenizer(cfg, teacher_cfg, path)
    _check_teacher_tensor_parallel(cfg, teacher_cfg, path)
    pp = cfg.parallel.pipeline_parallel
    if pp > 1 and teacher_cfg.model.num_layers % pp:
        raise ConfigError(f"distill.teacher: {path} has model.num_layers={teacher_cfg.model.num_layers}, which is not "
                          f"divisible by the run's parallel.pipeline_parallel={pp}: the teacher is pipelined with the "
                          "student, each stage holding num_layers / pipeline_parallel of its layers")
    if teacher_cfg.model.positions < cfg.model.seq_length:
        raise ConfigError(f"distill.teacher: {path} handles {teacher_cfg.model.positions} positions, the student's "
                          f"model.seq_length is {cfg.model.seq_length}")
    if cfg.distill.student_init == "every_kth_layer":
        t, s, k = teacher_cfg.model, cfg.model, cfg.distill.k
        same = ("style", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                "tie_embeddings", "max_position_embeddings", "make_vocab_size_divisible_by")
        diff = [f"{f}: teacher {getattr(t, f)!r} vs student {getattr(s, f)!r}" for f in same
                if getattr(t, f) != getattr(s, f)]
        if diff:
            raise ConfigError("distill.student_init=every_kth_layer copies teacher layers, so the layer shape must "
                              "match the teacher's:\n  " + "\n  ".join(diff))
        if (s.num_layers - 1) * k >= t.num_layers:
            raise ConfigError(f"distill.student_init=every_kth_layer: student layer {s.num_layers - 1} would come "
                              f"from teacher layer {(s.num_layers - 1) * k}, but the teacher has {t.num_layers} "
                              f"layers (lower distill.k or model.num_layers)")
        _check_section_weight_fields(cfg, teacher_cfg)
    if cfg.distill.aligns_layers:
        _check_alignment(cfg, teacher_cfg, path)


def _check_section_weight_fields(cfg: Config, teacher_cfg: Config) -> None:
    """every_kth_layer copies every tensor but the skipped layers: the architecture's settings that decide the
    parameter set (BERT: binary_head, residual_post_layernorm) must be the teacher's."""
    from largelm.model.registry import get_arch  # lazy (preflight imports no model code unless a run distills)

    arch = get_arch(cfg.model.arch)
    student, teacher = arch.section(cfg), arch.section(teacher_cfg)
    diff = [f"{arch.config_section}.{f}: teacher {getattr(teacher, f)!r} vs student {getattr(student, f)!r}"
            for f in arch.section_weight_fields if getattr(teacher, f) != getattr(student, f)]
    if diff:
        raise ConfigError("distill.student_init=every_kth_layer copies the teacher's parameters, so these settings "
                          "must match the teacher's:\n  " + "\n  ".join(diff))


def aligned_layers(cfg: Config) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs of ``distill.layer_map`` (0-based layer outputs)."""
    d = cfg.distill
    if isinstance(d.layer_map, list):
        return [tuple(pair) for pair in d.layer_map]
    return [(i, (i + 1) * d.k - 1) for i in range(cfg.model.num_layers)]


def _check_alignment(cfg: Config, teacher_cfg: Config, path: Path) -> None:
    """Hidden-state alignment compares vectors (same hidden_size, or through ``distill.hidden_projection``),
    attention alignment maps (same head count); the layer map must name teacher layers that exist."""
    t, s, d = teacher_cfg.model, cfg.model, cfg.distill
    if d.hidden_weight > 0 and t.hidden_size != s.hidden_size and not d.hidden_projection:
        raise ConfigError(f"distill.hidden_weight: hidden-state alignment needs the student's model.hidden_size "
                          f"({s.hidden_size}) to equal the teacher's ({t.hidden_size}, {path}), or a learned "
                          "projection between them: set distill.hidden_projection true (TinyBERT's W_h)")
    if d.attention_weight > 0 and t.num_attention_heads != s.num_attention_heads:
        raise ConfigError(f"distill.attention_weight: attention-map alignment needs the student's "
                          f"model.num_attention_heads ({s.num_attention_heads}) to equal the teacher's "
                          f"({t.num_attention_heads}, {path})")
    for student_layer, teacher_layer in aligned_layers(cfg):
        if teacher_layer >= t.num_layers:
            how = ("every_kth_layer: (i + 1) * distill.k - 1" if d.layer_map == "every_kth_layer"
                   else "the explicit map")
            raise ConfigError(f"distill.layer_map: student layer {student_layer} is aligned with teacher layer "
                              f"{teacher_layer} ({how}), but the teacher ({path}) has {t.num_layers} layers")
        pp = cfg.parallel.pipeline_parallel
        student_stage, teacher_stage = student_layer // (s.num_layers // pp), teacher_layer // (t.num_layers // pp)
        if student_stage != teacher_stage:  # layer counts divisible by pp: checked before
            raise ConfigError(f"distill.layer_map: student layer {student_layer} (pipeline stage {student_stage}) is "
                              f"aligned with teacher layer {teacher_layer} (stage {teacher_stage}) at "
                              f"parallel.pipeline_parallel={pp}: each aligned pair must sit on one stage (it is "
                              "computed there); pair layers of the same stage, e.g. layer_map every_kth_layer")


def _check_teacher_tokenizer(cfg: Config, teacher_cfg: Config, path: Path) -> None:
    """Equal vocabulary sizes do not make the same tokenizer (the KL would compare unrelated ids): compare the
    student's sentencepiece file (sha256) with the one the teacher's checkpoint manifest records, or else with the
    teacher's ``tokenizer.model`` file if it is still there; warn when neither is available."""
    teacher_tok, student_tok = Path(teacher_cfg.tokenizer.model), Path(cfg.tokenizer.model)
    if not student_tok.is_file():
        return  # preflight reports the student's missing tokenizer.model
    recorded = read_manifest(path).get("tokenizer_sha256") if (path / MANIFEST).is_file() else None
    if recorded:
        teacher_sha, teacher_desc = recorded, f"the tokenizer its manifest records ({teacher_tok} at the time)"
    elif teacher_tok.is_file():
        teacher_sha, teacher_desc = sha256_file(teacher_tok), f"tokenizer {teacher_tok}"
    else:
        warnings.warn(f"distill.teacher: {path} records no tokenizer hash and was trained with tokenizer.model="
                      f"{teacher_tok}, which is not there (from {Path.cwd()}): cannot verify that it is the "
                      f"student's tokenizer {student_tok}; only the vocabulary sizes were checked", stacklevel=2)
        return
    student_sha = sha256_file(student_tok)
    if teacher_sha != student_sha:
        raise ConfigError(f"distill.teacher: {path} was trained with {teacher_desc} (sha256 {teacher_sha[:12]}), "
                          f"the student's tokenizer.model is {student_tok} (sha256 {student_sha[:12]}): teacher "
                          "and student must share the tokenizer (same vocabulary size, different token ids)")


def _check_teacher_tensor_parallel(cfg: Config, teacher_cfg: Config, path: Path) -> None:
    """The teacher is built at the student's ``parallel.tensor_parallel`` (its shard on each rank)."""
    try:
        check_tensor_parallel(teacher_cfg.model, cfg.parallel.tensor_parallel)
    except ConversionError as err:
        raise ConfigError(f"distill.teacher: {path}: the teacher is built with the run's parallel.tensor_parallel="
                          f"{cfg.parallel.tensor_parallel}, but {err}") from None


def every_kth_layer_name(teacher_name: str, num_layers: int, k: int,
                         layer_prefix: str = _LAYER_PREFIX) -> Optional[str]:
    """The student parameter that teacher parameter ``teacher_name`` starts (``every_kth_layer``), or None: names
    outside the layers map to themselves, teacher layer i*k to student layer i, other layers to nothing."""
    if not teacher_name.startswith(layer_prefix):
        return teacher_name
    index, rest = teacher_name[len(layer_prefix):].split(".", 1)
    index = int(index)
    if index % k == 0 and index // k < num_layers:
        return f"{layer_prefix}{index // k}.{rest}"
    return None


def every_kth_layer_state(teacher_state: dict[str, torch.Tensor], num_layers: int, k: int,
                          layer_prefix: str = _LAYER_PREFIX) -> dict:
    """Student weights: everything outside the layers (embeddings, final norm, heads) from the teacher; student
    layer i = teacher layer i*k. ``layer_prefix``: the architecture's (``ArchSpec.layer_prefix``)."""
    out = {}
    for name, tensor in teacher_state.items():
        student_name = every_kth_layer_name(name, num_layers, k, layer_prefix)
        if student_name is not None:
            out[student_name] = tensor.clone()
    return out

"""Self-verification: the logits of a source and of its conversion on one fixed batch, and their difference.

Every conversion computes logits with the *source* in its own form (a training checkpoint in its own TP x PP
layout, spawned as that many ranks; a consolidated model as a megatron GPTModel on one rank; a Hugging Face
directory with ``transformers``) and with the *result* in its form, and fails when the largest absolute
difference over the real vocabulary exceeds the tolerance:

* ``FP32_TOLERANCE`` x max(1, max |logit|) = 1e-4 x ... when both sides hold fp32 weights (measured: 0 to
  ~6e-6 on the test models; only the summation order differs between layouts and implementations);
* ``BF16_TOLERANCE`` x max(1, max |logit|) = 5e-2 x ... when either side's weights are bf16 (rounding the weights
  to bf16 moved the test models' logits by ~3e-3).

All forwards run in fp32 on the CPU, with dropout off. The batch (``fixed_tokens``) is seeded, so a report is
reproducible: 2 sequences of min(seq positions, 64) token ids drawn uniformly from the real vocabulary.

BERT (``model.arch: bert``) is compared on its MLM logits *and* its binary-head (SOP/NSP) logits, as one maximum.
Its batch adds ``bert_inputs(tokens)``: token type 1 on the second half of each sequence, and padding (attention
mask 0) on the last quarter of the second sequence, so the segment embedding and the padding mask are exercised.
MLM logits at padded positions are zeroed before comparing (``drop_padded``): megatron masks padded *queries* too
(its mask is the outer product of the padding mask), transformers only padded keys, so the two differ there, and
no loss or prediction ever reads those positions.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from largelm.checkpoint.info import inspect_checkpoint
from largelm.checkpoint.reader import read_mp_rank
from largelm.config import ModelConfig, ParallelConfig
from largelm.convert.spawn import free_port, run_ranks
from largelm.errors import ConversionError, VerificationError
from largelm.model.bert import bert_inputs, drop_padded  # noqa: F401 - part of this module's API (tests, docs)
from largelm.model.parallel_forward import layout_forward  # noqa: F401 - part of this module's API (reshard)
from largelm.model.registry import get_arch
from largelm.parallel import groups
from largelm.parallel.cpu_compat import model_parallel_manual_seed

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 5e-2
BATCH, MAX_TOKENS, SEED = 2, 64, 1234


def fixed_tokens(model: ModelConfig, batch: int = BATCH, seed: int = SEED) -> torch.Tensor:
    """The verification batch: LongTensor [batch, min(positions, 64)] of ids in [0, vocab_size)."""
    length = min(model.positions, MAX_TOKENS)
    return torch.randint(0, model.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def _parts(logits, vocab_size: int) -> list[torch.Tensor]:
    """A forward's output as fp32 tensors: GPT logits, or BERT's (MLM logits, binary logits or None)."""
    if isinstance(logits, (tuple, list)):
        mlm, binary = logits
        return [torch.as_tensor(mlm).float()[..., :vocab_size]] + (
            [] if binary is None else [torch.as_tensor(binary).float()])
    return [torch.as_tensor(logits).float()[..., :vocab_size]]


def tolerance(*weight_dtypes: torch.dtype, reference: Optional[torch.Tensor] = None) -> float:
    """The stated tolerance for a comparison whose sides hold weights of ``weight_dtypes``; ``reference`` (the
    source's logits) scales it: ``FP32_TOLERANCE`` or ``BF16_TOLERANCE`` times max(1, max |logit|)."""
    scale = 1.0 if reference is None else max(1.0, max(p.abs().max().item() for p in _parts(reference, None)))
    base = FP32_TOLERANCE if all(d == torch.float32 for d in weight_dtypes) else BF16_TOLERANCE
    return base * scale


@dataclass
class Check:
    """One comparison: ``max |a - b|`` over the real vocabulary on the fixed batch."""

    what: str  # e.g. "checkpoint TP=2 PP=1 vs consolidated"
    max_abs_diff: float
    tolerance: float
    max_abs_logit: float
    tokens: list  # [batch, seq]

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.tolerance

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"verify {self.what}: max |logit diff| {self.max_abs_diff:.3e} (tolerance {self.tolerance:.1e}, "
                f"max |logit| {self.max_abs_logit:.2f}, batch {self.tokens[0]}x{self.tokens[1]}) {verdict}")

    def record(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def compare(what: str, a, b, vocab_size: int, tol: float, log=print, raise_on_failure: bool = True) -> Check:
    """Compare two forwards' outputs (logits tensors, or BERT's (MLM logits, binary logits) pairs)."""
    pa, pb = _parts(a, vocab_size), _parts(b, vocab_size)
    shapes = [tuple(t.shape) for t in pa], [tuple(t.shape) for t in pb]
    if shapes[0] != shapes[1]:
        raise VerificationError(f"verify {what}: outputs have shapes {shapes[0]} and {shapes[1]}")
    diff = max((x - y).abs().max().item() for x, y in zip(pa, pb))
    check = Check(what, diff, tol, max(x.abs().max().item() for x in pa), list(pa[0].shape[:2]))
    if log:
        log(check.line())
    if raise_on_failure and not check.ok:
        raise VerificationError(check.line() + " - the conversion does not compute what its source computes")
    return check


# --- megatron forwards ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def single_rank_group() -> Iterator[None]:
    """A one-rank gloo world + megatron parallel_state (TP=1, PP=1); reuses one that is already set up."""
    import torch.distributed as dist
    from megatron.core import parallel_state


    if dist.is_initialized():
        tp = None
        if parallel_state.model_parallel_is_initialized():
            tp = parallel_state.get_tensor_model_parallel_world_size()
        if dist.get_world_size() != 1 or tp != 1:
            raise ConversionError("a process group with another layout is active; cannot run a TP=1 forward here")
        yield
        return

    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed announces its CPU comm backend on stdout
        groups.init_distributed("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        groups.init_model_parallel(1, 1)
        yield
    finally:
        groups.destroy()


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


def build_model(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype = torch.float32, owner=None):
    """This rank's module in the layout ``parallel`` (the architecture's dense module or a pipeline stage), for
    inference. ``owner``: the Config or Consolidated model holding the architecture's own config section (BERT's
    ``bert``), if it has one. Sequence parallelism is left off: it changes how activations are split, not the
    weights.
    """
    parallel = parallel.model_copy(update={"sequence_parallel": False, "virtual_pipeline": None})
    model_parallel_manual_seed(0)
    arch = get_arch(model.arch)
    section = arch.section_args(owner) if owner is not None else ()
    if parallel.pipeline_parallel > 1:
        return arch.build_pipeline(model, parallel, *section, dtype=dtype).eval()
    return arch.build_model(model, parallel, *section, dtype=dtype).eval()


def load_native(module: torch.nn.Module, state: dict, what: str) -> None:
    """Load a state dict under the module's own parameter names; every parameter must be covered."""
    result = module.load_state_dict({k: v for k, v in state.items() if not k.endswith("_extra_state")}, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ConversionError(f"{what}: weights do not fit the model: missing {missing[:6]}, unexpected "
                              f"{result.unexpected_keys[:6]}")


def cut_vocab(logits, vocab_size: int):
    """Logits (or BERT's (logits, binary) pair) with the vocabulary padding removed, as torch tensors."""
    if isinstance(logits, (tuple, list)):
        mlm, binary = logits
        return cut_vocab(mlm, vocab_size), None if binary is None else torch.as_tensor(binary)
    return torch.as_tensor(logits)[..., :vocab_size].clone()


def to_numpy(logits):
    if isinstance(logits, (tuple, list)):
        return tuple(None if t is None else t.numpy() for t in logits)
    return None if logits is None else logits.numpy()


def consolidated_logits(c, tokens: torch.Tensor):
    """Logits of a consolidated model: megatron ``GPTModel``/``BertModel`` at TP=1 on one (in-process) gloo rank."""
    with _preserved_rng(), single_rank_group():
        model = build_model(c.model, ParallelConfig(), owner=c)
        padded = c.model.padded_vocab_size(1)
        load_native(model, {k: v.float() for k, v in c.padded_tensors(padded).items()}, "consolidated model")
        logits = layout_forward(model, tokens, c.model)
    return cut_vocab(logits, c.model.vocab_size)


def _checkpoint_parallel(info) -> ParallelConfig:
    """The layout a checkpoint's forward runs in: its TP x PP, every expert on each rank (the reader joins an
    expert-parallel checkpoint's experts, largelm/checkpoint/experts.py)."""
    return info.config.parallel.model_copy(update={"expert_parallel": 1})


def _checkpoint_rank(rank: int, world_size: int, step_dir: str, tokens: np.ndarray):
    info = inspect_checkpoint(step_dir, checksums=False)
    groups.init_distributed("gloo")
    try:
        groups.init_model_parallel(info.tensor_parallel, info.pipeline_parallel)
        model = build_model(info.config.model, _checkpoint_parallel(info), owner=info.config)
        native, _ = read_mp_rank(info, rank)  # one data-parallel replica: rank == model-parallel rank
        load_native(model, native, f"{info.path} model-parallel rank {rank}")
        return to_numpy(layout_forward(model, torch.from_numpy(tokens), info.config.model))
    finally:
        groups.destroy()


def checkpoint_logits(info, tokens: torch.Tensor, timeout_s: Optional[float] = None):
    """Logits of a training checkpoint in its own layout: TP x PP spawned ranks (one data-parallel replica),
    each loading its own shard's fp32 weights into the model class that trained it."""
    import torch.distributed as dist


    vocab = info.config.model.vocab_size
    if info.model_parallel == 1 and not dist.is_initialized():  # one rank: no need for a process
        with _preserved_rng(), single_rank_group():
            model = build_model(info.config.model, _checkpoint_parallel(info), owner=info.config)
            load_native(model, read_mp_rank(info, 0)[0], f"{info.path}")
            logits = layout_forward(model, tokens, info.config.model)
        return cut_vocab(logits, vocab)
    results = run_ranks(_checkpoint_rank, info.model_parallel, str(info.path), tokens.numpy(), timeout_s=timeout_s)
    logits = next(r for r in results if r is not None)
    if isinstance(logits, tuple):
        return cut_vocab(tuple(None if t is None else torch.from_numpy(t) for t in logits), vocab)
    return cut_vocab(torch.from_numpy(logits), vocab)

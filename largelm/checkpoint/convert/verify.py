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
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from largelm.checkpoint.convert.errors import ConversionError, VerificationError
from largelm.config import ModelConfig, ParallelConfig

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 5e-2
BATCH, MAX_TOKENS, SEED = 2, 64, 1234


def fixed_tokens(model: ModelConfig, batch: int = BATCH, seed: int = SEED) -> torch.Tensor:
    """The verification batch: LongTensor [batch, min(positions, 64)] of ids in [0, vocab_size)."""
    length = min(model.positions, MAX_TOKENS)
    return torch.randint(0, model.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def tolerance(*weight_dtypes: torch.dtype, reference: Optional[torch.Tensor] = None) -> float:
    """The stated tolerance for a comparison whose sides hold weights of ``weight_dtypes``; ``reference`` (the
    source's logits) scales it: ``FP32_TOLERANCE`` or ``BF16_TOLERANCE`` times max(1, max |logit|)."""
    scale = 1.0 if reference is None else max(1.0, torch.as_tensor(reference).float().abs().max().item())
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


def compare(what: str, a: torch.Tensor, b: torch.Tensor, vocab_size: int, tol: float, log=print,
            raise_on_failure: bool = True) -> Check:
    a, b = torch.as_tensor(a).float()[..., :vocab_size], torch.as_tensor(b).float()[..., :vocab_size]
    if a.shape != b.shape:
        raise VerificationError(f"verify {what}: logits have shapes {tuple(a.shape)} and {tuple(b.shape)}")
    diff = (a - b).abs().max().item()
    check = Check(what, diff, tol, a.abs().max().item(), list(a.shape[:2]))
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

    from largelm.parallel import groups

    if dist.is_initialized():
        tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else None
        if dist.get_world_size() != 1 or tp != 1:
            raise ConversionError("a process group with another layout is active; cannot run a TP=1 forward here")
        yield
        return
    from largelm.checkpoint.convert.spawn import free_port

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


def build_model(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype = torch.float32):
    """This rank's module in the layout ``parallel`` (dense ``GPTModel`` or a pipeline stage), for inference.

    Sequence parallelism is left off: it changes how activations are split, not the weights.
    """
    from largelm.parallel.cpu_compat import model_parallel_manual_seed

    parallel = parallel.model_copy(update={"sequence_parallel": False, "virtual_pipeline": None})
    model_parallel_manual_seed(0)
    if parallel.pipeline_parallel > 1:
        from largelm.model.pipeline import build_gpt_pipeline

        return build_gpt_pipeline(model, parallel, vocab_size=model.vocab_size, dtype=dtype).eval()
    from largelm.model.gpt import build_gpt_model

    return build_gpt_model(model, parallel, vocab_size=model.vocab_size, dtype=dtype).eval()


def load_native(module: torch.nn.Module, state: dict, what: str) -> None:
    """Load a state dict under the module's own parameter names; every parameter must be covered."""
    result = module.load_state_dict({k: v for k, v in state.items() if not k.endswith("_extra_state")}, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ConversionError(f"{what}: weights do not fit the model: missing {missing[:6]}, unexpected "
                              f"{result.unexpected_keys[:6]}")


@torch.no_grad()
def layout_forward(module: torch.nn.Module, tokens: torch.Tensor, hidden_size: int) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [b, s, V_padded] of ``tokens`` [b, s] through this rank's module; collective over
    the model-parallel group. Returned on the rank that holds the last pipeline stage (None elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tokens = tokens.long()
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1:
        logits = module(tokens, position_ids, None)  # [b, s, V/tp]
    else:
        stage = parallel_state.get_pipeline_model_parallel_rank()
        if stage == 0:
            x = (tokens,)
        else:
            x = torch.empty(tokens.shape[1], tokens.shape[0], hidden_size, dtype=torch.float32)
            dist.recv(x, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        out = module(x)
        if stage < pp - 1:
            dist.send(out.float().contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        logits = out.transpose(0, 1)  # [s, b, V/tp] -> [b, s, V/tp]
    tp = parallel_state.get_tensor_model_parallel_world_size()
    logits = logits.float().contiguous()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits, group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits


def consolidated_logits(c, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a consolidated model: megatron ``GPTModel`` at TP=1 on one (in-process) gloo rank."""
    with _preserved_rng(), single_rank_group():
        model = build_model(c.model, ParallelConfig())
        padded = c.model.padded_vocab_size(1)
        load_native(model, {k: v.float() for k, v in c.padded_tensors(padded).items()}, "consolidated model")
        logits = layout_forward(model, tokens, c.model.hidden_size)
    return logits[..., : c.model.vocab_size].clone()


def _checkpoint_rank(rank: int, world_size: int, step_dir: str, tokens: np.ndarray):
    from largelm.checkpoint.convert.consolidate import inspect_checkpoint, read_mp_rank
    from largelm.parallel import groups

    info = inspect_checkpoint(step_dir, checksums=False)
    groups.init_distributed("gloo")
    try:
        groups.init_model_parallel(info.tensor_parallel, info.pipeline_parallel)
        model = build_model(info.config.model, info.config.parallel)
        native, _ = read_mp_rank(info, rank)  # one data-parallel replica: rank == model-parallel rank
        load_native(model, native, f"{info.path} model-parallel rank {rank}")
        logits = layout_forward(model, torch.from_numpy(tokens), info.config.model.hidden_size)
        return None if logits is None else logits.numpy()
    finally:
        groups.destroy()


def checkpoint_logits(info, tokens: torch.Tensor, timeout_s: Optional[float] = None) -> torch.Tensor:
    """Logits of a training checkpoint in its own layout: TP x PP spawned ranks (one data-parallel replica),
    each loading its own shard's fp32 weights into the model class that trained it."""
    import torch.distributed as dist

    from largelm.checkpoint.convert.consolidate import read_mp_rank
    from largelm.checkpoint.convert.spawn import run_ranks

    if info.model_parallel == 1 and not dist.is_initialized():  # one rank: no need for a process
        with _preserved_rng(), single_rank_group():
            model = build_model(info.config.model, info.config.parallel)
            load_native(model, read_mp_rank(info, 0)[0], f"{info.path}")
            logits = layout_forward(model, tokens, info.config.model.hidden_size)
        return logits[..., : info.config.model.vocab_size].clone()
    results = run_ranks(_checkpoint_rank, info.model_parallel, str(info.path), tokens.numpy(), timeout_s=timeout_s)
    logits = next(r for r in results if r is not None)
    return torch.from_numpy(logits)[..., : info.config.model.vocab_size]

"""lm-evaluation-harness on largelm's own model: an ``lm_eval`` LM adapter and the harness run.

``LargelmLM`` wraps a full (TP=1, single-stage) GPTModel and its sentencepiece tokenizer, or any
``forward_logprobs`` callable (token ids -> log-probabilities) with that tokenizer: the adapter never knows how the
model runs (in-training evaluation at TP/PP/ZeRO-3 injects a collective forward, largelm/train/harness_eval.py). It
is lm-eval's ``TemplateLM`` (an ``lm_eval.api.model.LM``): lm-eval itself splits (context, continuation) into tokens
exactly as for its ``hf`` model (trailing context spaces move to the continuation; the pair is encoded whole and
split at the context's length; an empty context is the prefix token), so a Hugging Face export of the same weights,
whose tokenizer encodes to the same ids (largelm/convert/hf_tokenizer.py), scores the same. The prefix token is EOS:
the shards separate documents with EOS and never hold BOS. Inputs longer than ``max_length`` (the model's
``seq_length``) lose tokens on the left, as in lm-eval's ``hf`` model.

* ``loglikelihood``: sum over the continuation of ``log_softmax(logits)`` in fp32 over the real vocabulary
  (padded vocabulary rows are never a prediction), and whether every continuation token is the argmax.
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens, each token scored once.
* ``generate_until``: ``largelm.model.generate.generate_batch`` over up to ``batch_size`` requests with the same
  generation arguments (greedy unless ``do_sample``; the KV cache with a model, none with ``forward_logprobs``
  only); a row stops as soon as its text holds a stop string (``until``), and is cut before it.

``run_harness`` runs ``lm_eval.simple_evaluate`` on tasks found only under a task directory (lm-eval's own task
index is not loaded), with the Hugging Face hubs switched off: datasets are local files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import datasets
import huggingface_hub
import lm_eval
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from largelm.model.generate import generate_batch

OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0"}

# token ids [b, w] (CPU, long) -> fp32 log-probabilities [b, w, vocab] (CPU) of the next token at every position
LogprobForward = Callable[[torch.Tensor], torch.Tensor]


def offline_hub() -> None:
    """No dataset or model hub is reachable (here or in CI): never try. ``datasets`` and ``huggingface_hub`` read
    these variables when imported, so their module-level switches are set too."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    huggingface_hub.constants.HF_HUB_OFFLINE = True


class LargelmLM(TemplateLM):
    """lm-eval model over an in-memory largelm GPTModel (TP=1, one stage) and ``largelm.tokenizer.Tokenizer``; or,
    with ``model=None``, over ``forward_logprobs`` alone."""

    def __init__(self, model: Optional[torch.nn.Module], tokenizer, *, max_length: int, batch_size: int = 8,
                 max_gen_toks: int = 256, forward_logprobs: Optional[LogprobForward] = None):
        super().__init__()
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 2 (got {batch_size}, {max_length})")
        if (model is None) == (forward_logprobs is None):
            raise ValueError("LargelmLM takes a model or a forward_logprobs callable (one of them)")
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.forward_logprobs = forward_logprobs or self._model_logprobs
        self._device = next(model.parameters()).device if model is not None else torch.device("cpu")

    # --- tokens -------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.eos_id  # documents are separated by EOS in the shards; there is no BOS in them

    @property
    def tokenizer_name(self) -> str:
        return f"largelm-sentencepiece-{self.tokenizer.sha256[:16]}"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)  # no BOS/EOS added, as the data pipeline tokenizes documents

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # --- scoring ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _model_logprobs(self, batch: torch.Tensor) -> torch.Tensor:
        """``LogprobForward`` of the local model (eval mode for the forward; its mode is put back)."""
        was_training = self.model.training
        self.model.eval()
        try:
            batch = batch.to(self._device)
            positions = torch.arange(batch.shape[1], device=self._device).unsqueeze(0).expand_as(batch)
            logits = self.model(batch, positions, None)[..., :self.vocab_size].float()
            return F.log_softmax(logits, dim=-1).cpu()
        finally:
            self.model.train(was_training)

    def token_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Per sequence, fp32 log-probabilities [len, vocab] of the next token at every position (one forward of
        the right-padded batch: causal attention, so padding never reaches a real position)."""
        width = max(len(s) for s in sequences)
        batch = torch.full((len(sequences), width), self.eot_token_id, dtype=torch.long)
        for i, seq in enumerate(sequences):
            batch[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        logprobs = self.forward_logprobs(batch)
        return [logprobs[i, :len(seq)] for i, seq in enumerate(sequences)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ((context, continuation) or None, context ids, continuation ids)."""
        inputs = []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc or len(continuation_enc) > self.max_length:
                raise ValueError(f"cannot score a continuation of {len(continuation_enc)} tokens after "
                                 f"{len(context_enc)} context tokens (max_length {self.max_length})")
            inputs.append((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
        # longest first: batches of similar lengths pad little; results go back to the request order
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        results: list = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, logprobs in zip(chunk, self.token_logprobs([inputs[i] for i in chunk])):
                cont = torch.tensor(requests[i][2], dtype=torch.long)
                scored = logprobs[-len(cont):]  # the positions that predict the continuation tokens
                total = float(scored.gather(1, cont.unsqueeze(1)).sum())
                greedy = bool((scored.argmax(dim=-1) == cont).all())
                results[i] = (total, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ---------------------------------------------------------------------------------
    def _generation_args(self, gen_kwargs: Optional[dict]) -> tuple[tuple[str, ...], int, float, Optional[int]]:
        """(stop strings, max new tokens, temperature (0: greedy), top_k) of lm-eval's ``gen_kwargs``."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0)) if sample else 0.0
        top_k = kwargs.pop("top_k", None)
        return tuple(s for s in until if s), max_new, temperature, None if top_k is None else int(top_k)

    def _generated_text(self, ids: Sequence[int]) -> str:
        return self.tok_decode([t for t in ids if t != self.eot_token_id])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [req.args for req in requests]
        # requests with the same generation arguments share batches; results go back to the request order
        by_args: dict[tuple, list[int]] = {}
        for index, (_, gen_kwargs) in enumerate(args):
            by_args.setdefault(self._generation_args(gen_kwargs), []).append(index)
        out: list = [None] * len(requests)
        for (until, max_new, temperature, top_k), indices in by_args.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = [self.tok_encode(args[i][0])[-self.max_length:] or [self.prefix_token_id] for i in chunk]

                def stop(_row: int, generated: list[int], until=until) -> bool:
                    text = self._generated_text(generated)
                    return any(s in text for s in until)

                was_training = self.model is not None and self.model.training
                try:  # generate_batch puts a model in eval mode
                    rows = generate_batch(self.model, prompts, max_new, context=self.max_length,
                                          vocab_size=self.vocab_size, temperature=temperature, top_k=top_k,
                                          eos_id=self.eot_token_id, stop=stop,
                                          forward=None if self.model is not None else self.forward_logprobs)
                finally:
                    if was_training:
                        self.model.train()
                for i, prompt, row in zip(chunk, prompts, rows):
                    text = self._generated_text(row[len(prompt):])
                    for s in until:
                        text = text.split(s, 1)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
        return out


# --- the harness ----------------------------------------------------------------------------------------------

def run_harness(lm: lm_eval.api.model.LM, tasks: Sequence[str], task_dir: str | Path, *, limit: Optional[int] = None,
                log_samples: bool = False, bootstrap_iters: int = 1000, quiet: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` of ``lm`` on ``tasks`` defined under ``task_dir`` (only there), offline.
    Returns lm-eval's results dict (``results``, ``configs``, ``versions``, ``n-shot``, ... and ``samples`` when
    ``log_samples``)."""
    offline_hub()
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise FileNotFoundError(f"task directory {task_dir} does not exist (write it with largelm-eval --make-tasks)")
    if quiet:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"task {unknown[0]!r} is not defined under {task_dir} (there: "
                         f"{', '.join(manager.all_tasks) or 'none'})")
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                      log_samples=log_samples, bootstrap_iters=bootstrap_iters)
    return dict(results)


def flat_metrics(results: dict) -> dict[str, float]:
    """``eval/<task>/<metric>`` -> value for every numeric metric of lm-eval's results (stderr entries left out;
    a metric after a filter other than ``none`` is ``<metric>/<filter>``)."""
    out = {}
    for task, values in sorted(results.get("results", {}).items()):
        for key, value in sorted(values.items()):
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            out[f"eval/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
    return out

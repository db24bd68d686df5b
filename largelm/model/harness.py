"""lm-evaluation-harness on largelm's own model: an ``lm_eval`` LM adapter and the harness run.

``LargelmLM`` wraps a full (TP=1, single-stage) GPTModel and its sentencepiece tokenizer. It is lm-eval's
``TemplateLM`` (an ``lm_eval.api.model.LM``): lm-eval itself splits (context, continuation) into tokens exactly as
for its ``hf`` model (trailing context spaces move to the continuation; the pair is encoded whole and split at
the context's length; an empty context is the prefix token), so a Hugging Face export of the same weights, whose
tokenizer encodes to the same ids (largelm/convert/hf_tokenizer.py), scores the same. The prefix token is EOS:
the shards separate documents with EOS and never hold BOS. Inputs longer than ``max_length`` (the model's
``seq_length``) lose tokens on the left, as in lm-eval's ``hf`` model.

* ``loglikelihood``: sum over the continuation of ``log_softmax(logits)`` in fp32 over the real vocabulary
  (padded vocabulary rows are never a prediction), and whether every continuation token is the argmax.
* ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens, each token scored once.
* ``generate_until``: ``largelm.model.generate.generate_ids`` (greedy unless ``do_sample``), cut at the first
  stop string.

``run_harness`` runs ``lm_eval.simple_evaluate`` on tasks found only under a task directory (lm-eval's own task
index is not loaded), with the Hugging Face hubs switched off: datasets are local files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import datasets
import huggingface_hub
import lm_eval
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from largelm.model.generate import generate_ids

OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0"}


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
    """lm-eval model over an in-memory largelm GPTModel (TP=1, one stage) and ``largelm.tokenizer.Tokenizer``."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_length: int, batch_size: int = 8,
                 max_gen_toks: int = 256):
        super().__init__()
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 2 (got {batch_size}, {max_length})")
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self._device = next(model.parameters()).device

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
    def token_logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Per sequence, fp32 log-probabilities [len, vocab] of the next token at every position (one forward of
        the right-padded batch: causal attention, so padding never reaches a real position)."""
        was_training = self.model.training
        self.model.eval()
        try:
            width = max(len(s) for s in sequences)
            batch = torch.full((len(sequences), width), self.eot_token_id, dtype=torch.long)
            for i, seq in enumerate(sequences):
                batch[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            batch = batch.to(self._device)
            positions = torch.arange(width, device=self._device).unsqueeze(0).expand_as(batch)
            logits = self.model(batch, positions, None)[..., :self.vocab_size].float()
            logprobs = F.log_softmax(logits, dim=-1).cpu()
        finally:
            self.model.train(was_training)
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
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            ids = self.tok_encode(context)[-self.max_length:] or [self.prefix_token_id]
            was_training = self.model.training
            try:
                generated = generate_ids(self.model, ids, max_new, context=self.max_length,
                                         vocab_size=self.vocab_size, temperature=temperature,
                                         top_k=kwargs.pop("top_k", None), eos_id=self.eot_token_id)
            finally:
                self.model.train(was_training)
            text = self.tok_decode([t for t in generated[len(ids):] if t != self.eot_token_id])
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop, 1)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
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

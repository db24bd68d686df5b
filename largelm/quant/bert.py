"""What quantizing a BERT (megatron ``BertModel``) needs beyond the GPT path of largelm/quant/model.py: the
calibration forward on masked sentence-pair batches, the masked-LM validation loss/perplexity, and tokens/s.

The quantized layers are the same four linears per encoder layer (``encoder.layers.N.*``, ``TARGET`` in model.py);
the MLM head's transform (``lm_head.dense``), the pooler and the binary head stay unquantized, like the embeddings.
GPTQ's Hessians come from the loader's own masked batches (``BertMasker``: the inputs the model sees in training,
[MASK]/random/kept tokens included). Validation: the masker is seeded per sample (``data.seed``), so every pass
over the validation shards masks the same positions and "before" and "after" score the same predictions.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from largelm.config import Config, ConfigError
from largelm.data import build_loader
from largelm.model.bert import bert_forward_metrics, bert_loader_kwargs
from largelm.quant.model import token_mean_loss


def bert_calibration_forward(model: torch.nn.Module, batch: dict) -> None:
    model(batch["input_ids"], batch["attention_mask"], tokentype_ids=batch["token_type_ids"])


def masked_batches(cfg: Config, datasets: list, batch_size: int, *, infinite: bool, shuffle_buffer: int = 0):
    return build_loader(datasets=datasets, seq_length=cfg.model.seq_length, batch_size=batch_size, rank=0,
                        world_size=1, num_workers=0, shuffle_buffer=shuffle_buffer, seed=cfg.data.seed,
                        infinite=infinite, **bert_loader_kwargs(cfg))


@torch.no_grad()
def mlm_perplexity(model: torch.nn.Module, cfg: Config, batch_size: int = 8,
                   max_batches: Optional[int] = None) -> dict:
    """Masked-LM validation loss (mean over masked positions) and its exp over the validation shards, one pass."""
    datasets = [(s.path, s.weight) for s in cfg.data.valid]
    if not datasets:
        raise ConfigError("no validation data: the config has no data.valid")
    model.eval()

    def summed(batch):  # the loss is a mean over the masked positions: weigh it by their count
        masked = int((batch["mlm_labels"] != -100).sum())
        return bert_forward_metrics(model, batch, cfg.bert.objective)["mlm_loss"].double().item() * masked, masked

    return token_mean_loss(masked_batches(cfg, datasets, batch_size, infinite=False), summed, max_batches,
                           f"validation data {datasets} yielded no masked token")


@torch.no_grad()
def bert_tokens_per_s(models: dict[str, torch.nn.Module], cfg: Config, batch_size: int = 8,
                      repeats: int = 7) -> dict[str, float]:
    """Forward tokens/s of several BERTs, interleaved on one batch (see model.compare_tokens_per_s)."""
    s = cfg.model.seq_length
    ids = torch.randint(0, cfg.model.vocab_size, (batch_size, s), generator=torch.Generator().manual_seed(0))
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    best = {name: float("inf") for name in models}
    for model in models.values():
        model.eval()(ids, mask, tokentype_ids=types)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(ids, mask, tokentype_ids=types)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: batch_size * s / t for name, t in best.items()}

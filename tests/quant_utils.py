"""Shared by the quantization tests: a tiny GPT config (tokenizer-sized vocabulary), a model of it trained in
process, fresh copies of its weights and calibration batches from its training shards."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from mp_utils import single_rank_parallel_state
from train_utils import tiny_config

from largelm.config import config_from_dict
from largelm.data import build_loader
from largelm.model.gpt import gpt_forward_loss
from largelm.model.weights import load_full_state_dict
from largelm.parallel.cpu_compat import model_parallel_manual_seed
from largelm.quant import build_model, perplexity
from largelm.tokenizer import Tokenizer


def quant_tiny_config(tmp: Path, tokenizer_path: Path, shard_dir: Path, seq_length: int, **model):
    raw = yaml.safe_load(tiny_config(tmp, tokenizer_path, shard_dir, seq_length).read_text())
    raw["model"]["vocab_size"] = Tokenizer.load(tokenizer_path).vocab_size
    raw["model"]["ffn_hidden_size"] = 128
    raw["model"].update(model)
    return config_from_dict(raw)


def train_in_process(cfg, shard_dir: Path, seq_length: int, steps: int = 40) -> tuple[dict, dict]:
    """(fp32 state dict, fp32 validation metrics) of ``cfg``'s model after ``steps`` AdamW steps (seed 0)."""
    with single_rank_parallel_state():
        torch.manual_seed(0)
        model_parallel_manual_seed(0)
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        loader = build_loader(datasets=[(shard_dir / "train", 1.0)], seq_length=seq_length, batch_size=8,
                              rank=0, world_size=1, num_workers=0, shuffle_buffer=64, seed=0, infinite=True)
        it = iter(loader)
        for _ in range(steps):
            _, loss = gpt_forward_loss(model, next(it)["tokens"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        return state, perplexity(model, cfg, batch_size=16)


def fresh_model(cfg, state: dict) -> torch.nn.Module:
    """A new model holding ``state`` (eval mode); needs a parallel state (single_rank_parallel_state)."""
    model = build_model(cfg)
    load_full_state_dict(model, state)
    return model.eval()


def calibration_batches(cfg, count: int, batch_size: int, seed: int = 1) -> list[torch.Tensor]:
    """The first ``count`` token batches [b, s+1] of the config's training shards, unshuffled."""
    loader = build_loader(datasets=[(s.path, 1.0) for s in cfg.data.train], seq_length=cfg.model.seq_length,
                          batch_size=batch_size, rank=0, world_size=1, num_workers=0, shuffle_buffer=0, seed=seed,
                          infinite=False)
    return [b["tokens"] for _, b in zip(range(count), loader)]

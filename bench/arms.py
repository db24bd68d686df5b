"""The training steps compared by P1/P2/P3: largelm's, and what a user would write without it.

Every arm does the same work per call: one optimizer step over ``grad_accum_steps`` micro-batches taken from
its own ``Cycle`` over the *same* list of batches (so all arms see the same tokens in the same order), loss =
mean next-token cross-entropy, gradient clipping at ``optimizer.grad_clip``, AdamW with largelm's betas/eps/
weight-decay groups, largelm's LR schedule.

* ``LargelmStep``: ``largelm.train.step.DenseStep`` - the megatron-core GPTModel inside the DeepSpeed engine,
  exactly what ``Trainer.train_step`` runs per rank (ZeRO stage and precision from the config).
* ``MegatronPlainStep`` (diagnostic): the same megatron-core GPTModel in a bare loop with torch AdamW, no
  DeepSpeed; splits P1's overhead into "model implementation" and "engine".
* ``ReferenceStep``: the plain-PyTorch GPT of tests/reference_gpt.py (nanoGPT-style; independent statement of
  the same network) in a bare loop with torch AdamW: P1's baseline.
* ``HFStep``: Hugging Face ``GPT2LMHeadModel`` with the same shape (exact-erf GeLU, no dropout, tied
  embeddings, padded vocab) in a bare loop with torch AdamW: P2's baseline (the attention implementation is
  transformers' default, recorded in the result).

All non-largelm arms start from a copy of the largelm model's initial weights (megatron layout mapped as in
tests/reference_gpt.py; HF's Conv1D weights are [in, out], hence transposed). ``bf16``: largelm keeps bf16
weights with fp32 master weights and fp32 gradient accumulation in DeepSpeed's optimizer; a PyTorch user gets the
same split (bf16 compute, fp32 master weights/optimizer) from fp32 weights under ``torch.autocast("cpu",
torch.bfloat16)``, which is what the plain arms do.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from common import Cycle, bench_config, config_summary, device, interleaved, real_batches, seed_all
from report import stats

from largelm.hardware import is_bf16


def megatron_state_dict(module: torch.nn.Module) -> dict:
    """fp32 copies of a (TP=1) megatron GPTModel's tensors, without Transformer-Engine ``_extra_state`` slots."""
    return {k: v.detach().float().clone() for k, v in module.state_dict().items()
            if v is not None and not k.endswith("_extra_state")}


class PlainLoop:
    """What a PyTorch user writes: forward/backward per micro-batch, clip, AdamW, LR schedule, zero_grad."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], cfg,
                 batches: Cycle, bf16_autocast: bool):
        from largelm.train.optim import param_groups
        from largelm.train.schedule import build_scheduler

        o = cfg.optimizer
        self.device = device()
        model.to(self.device)
        self.model, self.loss_fn, self.cfg, self.batches = model, loss_fn, cfg, batches
        self.optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                           eps=o.eps, weight_decay=o.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, o, cfg.train.steps)
        self.autocast = bf16_autocast

    def __call__(self) -> torch.Tensor:
        ga = self.cfg.train.grad_accum_steps
        self.model.train()
        losses = []
        for _ in range(ga):
            tokens = next(self.batches)["tokens"].to(self.device)
            ctx = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast
                   else contextlib.nullcontext())
            with ctx:
                loss = self.loss_fn(tokens)
            (loss / ga).backward()
            losses.append(loss.detach())
        if self.cfg.optimizer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optimizer.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean()


class LargelmStep:
    """largelm's per-rank step: DenseStep (megatron-core GPTModel in the DeepSpeed engine)."""

    name = "largelm"

    def __init__(self, cfg, batches: Cycle):
        from largelm.train.step import DenseStep

        self.step = DenseStep(cfg, world_size=1)
        self.engine = self.step.engine
        self.batches = batches

    def initial_state_dict(self) -> dict:
        return megatron_state_dict(self.engine.module)

    def __call__(self) -> torch.Tensor:
        return self.step.train_step(self.batches)


def largelm_case(model: str, precision: str, mb: int, ga: int, zero_stage: int = 2) -> tuple:
    """``(cfg, batches, LargelmStep)`` for one benchmark case: the config, 8 real micro-batches (every arm cycles
    over this same list) and largelm's step built after seeding, so its initial weights are the run's.
    ``precision``: fp32, bf16 or auto (resolved on this machine as the trainer does: ``largelm.hardware``)."""
    cfg = bench_config(model, precision=precision, zero_stage=zero_stage, micro_batch_size=mb, grad_accum_steps=ga)
    batches = real_batches(cfg, 8)
    seed_all(cfg.train.seed)
    return cfg, batches, LargelmStep(cfg, Cycle(batches))


def compare_arms(cfg, steppers: list, *, model: str, reps: int, steps: int, label: str, **extra) -> tuple[dict, dict]:
    """Step 1 of every arm (same weights and batch: the same loss), then ``reps`` interleaved repetitions of
    ``steps`` optimizer steps. Returns the case's shared result fields (``extra`` after the run's shape) and the
    raw per-repetition step times by arm name."""
    first = {a.name: float(a()) for a in steppers}
    times = interleaved({a.name: a for a in steppers}, reps=reps, steps_per_rep=steps, warmup=1, label=label)
    summary = config_summary(cfg)
    tokens_per_step = summary["tokens_per_step_per_rank"]
    out = {
        "model": model, "precision": summary["precision"], "config": summary,
        "reps": reps, "steps_per_rep": steps, **extra,
        "first_step_loss": first,
        "step_time_s": {k: stats(v) for k, v in times.items()},
        "tokens_per_s": {k: stats([tokens_per_step / t for t in v]) for k, v in times.items()},
    }
    return out, times


class MegatronPlainStep(PlainLoop):
    """The same megatron-core GPTModel (fp32 weights) in a bare PyTorch loop: no DeepSpeed."""

    name = "megatron+AdamW"

    def __init__(self, cfg, batches: Cycle, state_dict: dict):
        from largelm.model.gpt import build_gpt_model, gpt_forward_loss

        model = build_gpt_model(cfg.model, cfg.parallel, vocab_size=cfg.model.vocab_size, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise KeyError(f"megatron state dict mismatch: missing {missing}, unexpected {unexpected}")
        super().__init__(model, lambda tokens: gpt_forward_loss(model, tokens)[1], cfg, batches,
                         bf16_autocast=is_bf16(cfg))


class ReferenceStep(PlainLoop):
    """tests/reference_gpt.py's plain-PyTorch GPT in a bare PyTorch loop."""

    name = "plain PyTorch"

    def __init__(self, cfg, batches: Cycle, state_dict: dict):
        from reference_gpt import RefConfig, ReferenceGPT

        model = ReferenceGPT(RefConfig.from_model_config(cfg.model, cfg.model.padded_vocab_size()))
        model.load_from_megatron(state_dict)

        def loss_fn(tokens: torch.Tensor) -> torch.Tensor:
            with torch.device(tokens.device):  # the reference builds its mask/positions on the default device
                logits = model(tokens[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

        super().__init__(model, loss_fn, cfg, batches, bf16_autocast=is_bf16(cfg))


def hf_gpt2(cfg, state_dict: Optional[dict] = None, attn_implementation: Optional[str] = None):
    """``GPT2LMHeadModel`` with largelm's gpt2-style shape; weights copied from a megatron state dict if given."""
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    if m.style != "gpt2":
        raise ValueError("the HF comparison uses GPT-2 style models")
    hf_cfg = GPT2Config(
        vocab_size=m.padded_vocab_size(), n_positions=m.positions, n_embd=m.hidden_size, n_layer=m.num_layers,
        n_head=m.num_attention_heads, n_inner=m.ffn_size, activation_function="gelu",  # exact erf GeLU, as megatron
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=m.norm_epsilon,
        tie_word_embeddings=m.tie_embeddings, use_cache=False, bos_token_id=None, eos_token_id=None,
    )
    if attn_implementation:
        hf_cfg._attn_implementation = attn_implementation
    model = GPT2LMHeadModel(hf_cfg).float()
    if state_dict is not None:
        load_megatron_into_hf(model, state_dict, cfg)
    return model


@torch.no_grad()
def load_megatron_into_hf(model, sd: dict, cfg) -> None:
    """megatron-core GPTModel (TP=1, gpt2 style) tensors -> GPT2LMHeadModel, every HF parameter written once."""
    from reference_gpt import RefConfig, split_megatron_qkv

    ref_cfg = RefConfig.from_model_config(cfg.model, cfg.model.padded_vocab_size())
    t = model.transformer
    written = set()

    def put(param: torch.nn.Parameter, value: torch.Tensor) -> None:
        if param.shape != value.shape:
            raise ValueError(f"shape {tuple(value.shape)} does not fit HF parameter {tuple(param.shape)}")
        param.copy_(value)
        written.add(id(param))

    put(t.wte.weight, sd["embedding.word_embeddings.weight"])
    put(t.wpe.weight, sd["embedding.position_embeddings.weight"])
    for i, block in enumerate(t.h):
        p = f"decoder.layers.{i}."
        put(block.ln_1.weight, sd[p + "input_layernorm.weight"])
        put(block.ln_1.bias, sd[p + "input_layernorm.bias"])
        put(block.ln_2.weight, sd[p + "pre_mlp_layernorm.weight"])
        put(block.ln_2.bias, sd[p + "pre_mlp_layernorm.bias"])
        q, k, v = split_megatron_qkv(sd[p + "self_attention.linear_qkv.weight"], ref_cfg)  # [out, in] each
        put(block.attn.c_attn.weight, torch.cat([q, k, v], 0).t())  # Conv1D: [in, out]
        q, k, v = split_megatron_qkv(sd[p + "self_attention.linear_qkv.bias"], ref_cfg)
        put(block.attn.c_attn.bias, torch.cat([q, k, v], 0))
        put(block.attn.c_proj.weight, sd[p + "self_attention.linear_proj.weight"].t())
        put(block.attn.c_proj.bias, sd[p + "self_attention.linear_proj.bias"])
        put(block.mlp.c_fc.weight, sd[p + "mlp.linear_fc1.weight"].t())
        put(block.mlp.c_fc.bias, sd[p + "mlp.linear_fc1.bias"])
        put(block.mlp.c_proj.weight, sd[p + "mlp.linear_fc2.weight"].t())
        put(block.mlp.c_proj.bias, sd[p + "mlp.linear_fc2.bias"])
    put(t.ln_f.weight, sd["decoder.final_layernorm.weight"])
    put(t.ln_f.bias, sd["decoder.final_layernorm.bias"])
    if not cfg.model.tie_embeddings:
        put(model.lm_head.weight, sd["output_layer.weight"])
    missing = [n for n, prm in model.named_parameters() if id(prm) not in written]
    if missing:
        raise KeyError(f"HF parameters not written: {missing}")


class HFStep(PlainLoop):
    """transformers' GPT2LMHeadModel in a bare PyTorch loop (the usual alternative)."""

    name = "HF transformers"

    def __init__(self, cfg, batches: Cycle, state_dict: dict, attn_implementation: Optional[str] = None,
                 precision: Optional[str] = None, name: Optional[str] = None):
        """``precision``: the HF arm's own (default: the config's); ``name``: the arm's label."""
        self.name = name or self.name
        model = hf_gpt2(cfg, state_dict, attn_implementation)
        self.attn_implementation = model.config._attn_implementation

        def loss_fn(tokens: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids=tokens[:, :-1]).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

        super().__init__(model, loss_fn, cfg, batches,
                         bf16_autocast=precision == "bf16" if precision else is_bf16(cfg))

"""One forward of a token batch through this rank's part of a tensor/pipeline-parallel model, as a collective.

Used by conversion verification (largelm/convert/verify.py: a checkpoint in its own TP x PP layout) and by
in-training evaluation (largelm/train/harness_eval.py: the training model, any layout). Every rank of the
model-parallel group calls it with the same tokens; the architecture's ``probe`` (largelm/model/registry.py) says
how to run its dense module and its pipeline stages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from largelm.config import ModelConfig
from largelm.model.registry import get_arch


def _stage_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype this stage computes in (activations cross stages as fp32 and are cast to it)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def layout_forward(module: torch.nn.Module, tokens: torch.Tensor, model: ModelConfig, *,
                   sequence_parallel: bool = False):
    """Full-vocabulary logits [b, s, V_padded] of ``tokens`` [b, s] through this rank's module of a ``model``
    (its architecture's ``probe`` says how to run it); collective over the model-parallel group. Returned on the
    ranks that hold the last pipeline stage (None elsewhere). BERT gives (logits, binary logits or None) on
    ``bert_inputs(tokens)``. ``module`` may be a DeepSpeed engine around a dense model (ZeRO-3 gathers its
    parameters in the forward). ``sequence_parallel``: the model splits activations along the sequence over the TP
    ranks (``s`` must then be a multiple of TP), so a stage's hidden state is [s/tp, b, h]."""
    probe = get_arch(model.arch).probe
    tokens = tokens.long()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if pp == 1:
        logits, extra = probe.dense(module, tokens)  # [b, s, V/tp], (BERT: binary logits)
    else:  # a pipeline stage: hidden [s, b, h] passes between stages
        stage = parallel_state.get_pipeline_model_parallel_rank()
        if stage == 0:
            x = probe.first_stage_input(tokens)
        else:
            local = tokens.shape[1] // tp if sequence_parallel else tokens.shape[1]
            x = torch.empty(local, tokens.shape[0], model.hidden_size, dtype=torch.float32, device=tokens.device)
            dist.recv(x, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            x = probe.stage_input(x.to(_stage_dtype(module)), tokens)
        # a stage whose forward carries more than the model (distillation's student: the teacher's stage beside it)
        # gives its model-only forward as ``model_forward``
        out = getattr(module, "model_forward", module)(x)
        if stage < pp - 1:
            dist.send(probe.stage_hidden(out).float().contiguous(),
                      dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        logits, extra = probe.last_stage_outputs(out)
        logits = logits.transpose(0, 1)  # [s, b, V/tp] -> [b, s, V/tp]
    logits = logits.float().contiguous()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits, group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return probe.finish(logits, extra, tokens)

"""megatron-core 0.16.1 patches applied while a model is *built* (``cpu_compat`` holds the process-wide CPU ones).

``bert_norms(sequence_parallel)``: with sequence parallelism every norm that runs on sequence-split activations must
mark its weights ``sequence_parallel`` so their partial gradients are summed over the TP group
(``largelm.parallel.sequence_parallel``); megatron's torch fallback norm (``WrappedTorchNorm``) refuses SP instead.
A BERT layer's two norms are spec slots (``largelm.model.bert_layers.bert_layer_spec``), but the encoder's final
LayerNorm (``transformer_block.LayerNormImpl``) and the MLM head's (``bert_lm_head.LNImpl``) are module globals
megatron reads while building ``BertModel``; ``bert_norms`` points them at ``SequenceParallelNorm`` for the duration
of the build, and only with SP. Listed in ``PATCHES`` (and ``largelm.parallel.ALL_PATCHES``).

``moe_router_gemm`` (``install_moe_compat``, called by the MoE model builder): megatron's MoE router names
Transformer Engine's ``te_general_gemm`` in a branch taken whenever it is not None, but binds the name only when
Transformer Engine imports; without TE the router's first forward raises NameError. Binding it to None selects
megatron's own torch.mm path (the one TE-less megatron means to take).

``deferred_jit_fuser`` is installed by ``largelm/__init__.py`` itself (it must precede megatron's import; the module
is ``largelm/megatron_jit.py``) and listed here with the other megatron patches.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from megatron.core.models.bert import bert_lm_head
from megatron.core.transformer import transformer_block
from megatron.core.transformer.moe import moe_utils

from largelm.parallel.patches import Patch
from largelm.parallel.sequence_parallel import SequenceParallelNorm

PATCHES = (
    Patch(
        name="bert_sp_norms", library="megatron-core 0.16.1", scope="model build",
        target="megatron.core.transformer.transformer_block.LayerNormImpl, "
               "megatron.core.models.bert.bert_lm_head.LNImpl -> SequenceParallelNorm",
        replaces="WrappedTorchNorm (no apex/Transformer Engine), which asserts sequence parallelism is off",
        why="BertModel builds its final and MLM-head LayerNorms from these globals, not from the layer spec; under "
            "SP their weights must be marked sequence_parallel so their gradients are summed over TP",
        when="while building a BERT (BertModel or pipeline stages) with parallel.sequence_parallel",
        test="tests/test_bert.py::test_tensor_parallel_2_equals_single_rank",
    ),
    Patch(
        name="moe_router_gemm", library="megatron-core 0.16.1", scope="process",
        target="megatron.core.transformer.moe.moe_utils.te_general_gemm = None (only when unbound)",
        replaces="an unbound module global: RouterGatingLinearFunction tests `te_general_gemm is not None`",
        why="without Transformer Engine the name is never bound, so every MoE router forward raises NameError; None "
            "selects megatron's torch.mm router gemm",
        when="building a model.arch='moe' model without Transformer Engine (every CPU run; GPUs without TE)",
        test="tests/test_moe.py::test_moe_forward_backward_single_rank",
    ),
    Patch(
        name="deferred_jit_fuser", library="megatron-core 0.16.1", scope="process",
        target="megatron.core.jit.jit_fuser -> largelm.megatron_jit.lazy_compile",
        replaces="torch.compile, applied to ~40 fusion functions while megatron.core is imported",
        why="the first torch.compile imports torch._dynamo and inductor: seconds of every process's start-up, for "
            "functions that never run on CPU (fusions off); on GPU they compile at their first call instead",
        when="every process that imports largelm before megatron (ranks, tools, tests): an import hook installed by "
             "largelm/__init__.py",
        test="tests/test_megatron_jit.py::test_megatron_imports_without_compiling_and_compiles_on_first_call",
    ),
)


@contextlib.contextmanager
def bert_norms(sequence_parallel: bool) -> Iterator[None]:
    """While building a BERT (``BertModel`` or pipeline stages) with sequence parallelism, megatron's final-norm and
    MLM-head-norm classes are ``SequenceParallelNorm`` (module docstring); without SP nothing changes."""
    if not sequence_parallel:
        yield
        return
    saved = transformer_block.LayerNormImpl, bert_lm_head.LNImpl
    transformer_block.LayerNormImpl = bert_lm_head.LNImpl = SequenceParallelNorm
    try:
        yield
    finally:
        transformer_block.LayerNormImpl, bert_lm_head.LNImpl = saved


def install_moe_compat() -> bool:
    """Bind megatron's missing ``te_general_gemm`` to None when Transformer Engine is absent (``moe_router_gemm``).
    Idempotent; returns whether the name was (already) patched."""
    if getattr(moe_utils, "HAVE_TE", False):
        return False
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    return True

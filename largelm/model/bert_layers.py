"""BERT layer specs: megatron-core's pre-LN BERT layer, and the original (post-LN) BERT built from the same blocks.

``bert_layer_spec(bert_cfg)`` is what ``BertModel`` takes as ``transformer_layer_spec``:

* ``bert.residual_post_layernorm: false`` (default): megatron-core's ``bert_layer_local_spec`` as is. A pre-LN
  layer: ``x + attn(LN1(x))``, then ``x + mlp(LN2(x))``, and a final LayerNorm after the last layer.
* ``bert.residual_post_layernorm: true``: Megatron-LM's ``--apply-residual-connection-post-layernorm`` (a
  TransformerConfig field megatron-core 0.16 still declares but no longer implements): the residual branch starts
  from the *normalised* input, ``u = LN1(x); u + attn(u)``, then ``v = LN2(.); v + mlp(v)``. With the final
  LayerNorm that BertModel always applies, this is exactly the original BERT (post-LN, the layout of Hugging Face
  ``BertForMaskedLM``) with every LayerNorm moved one slot earlier: layer 0's ``input_norm`` is BERT's embedding
  LayerNorm, layer i's ``mlp_norm`` is BERT layer i's attention-output LayerNorm, layer i+1's ``input_norm`` (or the
  final LayerNorm) is BERT layer i's output LayerNorm. Only the placement of dropout differs (it runs before the
  embedding LayerNorm here, after it in BERT), so eval-mode forwards are identical.

Sequence parallelism (``bert_layer_spec(..., sequence_parallel=True)``): every norm that runs on sequence-split
activations must mark its weights ``sequence_parallel`` so their partial gradients are summed over the TP group
(largelm/parallel/sequence_parallel.py); megatron's torch fallback norm refuses SP instead. The layer's two norms are
spec slots, set here; the encoder's final LayerNorm and the MLM head's are megatron module globals, which
``largelm.parallel.megatron_compat.bert_norms`` swaps for the duration of the build (a listed library patch).

``ResidualFromNormLayer`` keeps megatron's ``TransformerLayer`` for everything (attention, MLP, bias-dropout-add,
recompute, tensor parallelism) and only feeds it normalised inputs: its own two norms are ``input_norm`` and
``mlp_norm``, and megatron's ``input_layernorm``/``pre_mlp_layernorm`` slots are identities, so the residual that
megatron's layer keeps is the norm's output.
"""

from __future__ import annotations

import dataclasses

from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer

from largelm.parallel.sequence_parallel import SequenceParallelNorm


class ResidualFromNormLayer(TransformerLayer):
    """megatron ``TransformerLayer`` whose residual connections start after the LayerNorms (see module docstring)."""

    def __init__(self, config, submodules, *args, **kwargs):
        norms = submodules.input_layernorm, submodules.pre_mlp_layernorm
        inner = dataclasses.replace(submodules, input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp)
        super().__init__(config, inner, *args, **kwargs)
        self.submodules_config = submodules
        eps = self.config.layernorm_epsilon
        self.input_norm = build_module(norms[0], config=self.config, hidden_size=self.config.hidden_size, eps=eps)
        self.mlp_norm = build_module(norms[1], config=self.config, hidden_size=self.config.hidden_size, eps=eps)

    def _forward_attention(self, hidden_states, *args, **kwargs):
        return super()._forward_attention(self.input_norm(hidden_states), *args, **kwargs)

    def _forward_mlp(self, hidden_states, *args, **kwargs):
        return super()._forward_mlp(self.mlp_norm(hidden_states), *args, **kwargs)


def bert_layer_spec(residual_post_layernorm: bool = False, sequence_parallel: bool = False) -> ModuleSpec:
    """The layer spec for ``bert.residual_post_layernorm`` and ``parallel.sequence_parallel`` (module docstring)."""
    if not residual_post_layernorm and not sequence_parallel:
        return bert_layer_local_spec
    submodules = bert_layer_local_spec.submodules
    if sequence_parallel:
        submodules = dataclasses.replace(submodules, input_layernorm=SequenceParallelNorm,
                                         pre_mlp_layernorm=SequenceParallelNorm)
    return ModuleSpec(module=ResidualFromNormLayer if residual_post_layernorm else bert_layer_local_spec.module,
                      params=dict(bert_layer_local_spec.params or {}), submodules=submodules)

"""Pipeline parameter names -> dense-model names, for both pipelines (GPT: largelm/model/pipeline.py, BERT:
largelm/model/bert_pipeline.py). Names only: nothing is built, so checkpoint tools can use it on any machine.

DeepSpeed names a stage's parameters ``<layer index>.<key>``; tied modules (the word embedding held by the first and
the last stage) are ``tied_modules.word_embeddings.<key>``. Both pipelines lay out layer 0 = embedding
(``embedding.*``), 1..L = transformer layers (``layer.*`` -> ``<stack>.layers.{i-1}.*``), L+1 = final norm
(``norm.*`` -> ``<stack>.final_layernorm.*``), then their own head layers, whose keys are already dense names.
"""

from __future__ import annotations

TIED_KEY = "word_embeddings"
TIED_PREFIX = f"tied_modules.{TIED_KEY}."
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
# key prefixes of the layers after the final norm (L+2, L+3, ...)
GPT_HEADS = (("output_layer.weight",),)
BERT_HEADS = (("lm_head.", "pooler.", "binary_head."), ("output_layer.weight",), ("output_layer.bias",))


def pipeline_name_to_dense(name: str, num_layers: int, stack: str, heads: tuple[tuple[str, ...], ...]) -> str:
    """The dense-model name of pipeline parameter ``name``. ``stack`` is the dense model's layer stack
    (``decoder``/``encoder``); ``heads[j]`` are the key prefixes layer L+2+j may hold. The last stage's tied copy
    of the word embedding maps to ``embedding.word_embeddings.weight`` too. ``KeyError`` for anything else."""
    if name.startswith(TIED_PREFIX):
        rest = name[len(TIED_PREFIX):]
        if rest.startswith("embedding."):  # first stage: the embedding module
            return rest
        if rest == "word_embeddings.weight":  # last stage: the output projection's copy
            return WORD_EMBEDDINGS
        raise KeyError(f"unknown tied pipeline parameter {name!r}")
    index, sep, key = name.partition(".")
    if not sep or not index.isdigit():
        raise KeyError(f"{name!r} is not a pipeline parameter name (<layer index>.<key>)")
    index = int(index)
    if index == 0 and key.startswith("embedding."):
        return key
    if 1 <= index <= num_layers and key.startswith("layer."):
        return f"{stack}.layers.{index - 1}.{key[len('layer.'):]}"
    if index == num_layers + 1 and key.startswith("norm."):
        return f"{stack}.final_layernorm." + key[len("norm."):]
    head = index - num_layers - 2
    if 0 <= head < len(heads) and key.startswith(heads[head]):
        return key
    raise KeyError(f"pipeline parameter {name!r} does not fit a model of {num_layers} layers")

"""Models on megatron-core. Importing the package is cheap (no megatron): import the module you need.

    registry.py          one ArchSpec per architecture: builders, forward/loss, FLOPs, converters, name maps
    specs.py             config -> TransformerConfig + local layer spec (shape apart from the parallel blocks)
    gpt.py / bert.py     the dense models (megatron's GPTModel / BertModel)
    pipeline.py          pipeline stages (DeepSpeed PipelineModule) built from the same layers
    bert_pipeline.py     BERT's pipeline stages
    layout.py            parameter names, shapes and TP/PP rules (used by the checkpoint reader and converters)
    weights.py           load full (TP=1) weights into any layout
    flops.py             FLOPs per token, matmul shapes
    hf/                  Hugging Face state-dict adapters (pure tensor mappings; conversion picks one by registry)
"""

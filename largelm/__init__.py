"""largelm: distributed GPT/BERT pretraining on megatron-core + DeepSpeed, runnable on CPU."""

__version__ = "0.1.0"

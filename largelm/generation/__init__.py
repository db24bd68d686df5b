"""Run a trained model for text: load any checkpoint layout for generation (``load``), the ``largelm-generate``
command line (``cli``). The KV-cache generation loop itself is largelm/model/generate.py."""

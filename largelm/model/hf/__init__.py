"""Hugging Face ``transformers`` state-dict adapters: pure tensor mappings between a Hugging Face model's weights
and largelm's dense megatron model (torch, config and errors only; ``largelm.convert.hf`` talks to transformers
and picks the adapter through the architecture registry, largelm/model/registry.py).

    gpt2.py    gpt2 style  <-> GPT2LMHeadModel
    llama.py   llama style <-> LlamaForCausalLM
    mixtral.py arch moe    <-> MixtralForCausalLM
    bert.py    arch bert   <-> (Megatron)BertForPreTraining / (Megatron)BertForMaskedLM
    common.py  what the GPT imports share;  qkv.py  megatron's fused QKV <-> separate Q, K, V
"""

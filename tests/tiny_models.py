"""The tiny random-weight models the tests build (one place, so their configs do not drift apart).

tiny_llama(): a Hugging Face LLaMA with random weights (torch seed `seed`), 2 layers of width 64 unless
told otherwise; keyword arguments beyond the named ones go to LlamaConfig as they are."""
from __future__ import annotations


def tiny_llama(vocab: int = 256, hidden: int = 64, intermediate: int = 128, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, tied: bool = False, seed: int = 0, **config):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config.setdefault("max_position_embeddings", 256)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                        tie_word_embeddings=tied, **config)).eval()

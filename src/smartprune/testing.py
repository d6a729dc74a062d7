"""Tiny random models of the families in the adapter table (two blocks, width 32), built from their
transformers configs: what the tests and `benchmarks/families.py` run every family through, offline.
A helper for tests and benchmarks, not part of the public API (`smartprune.__all__`).

Each config exercises its family's quirks: GQA, q/k norms, Gemma 3's sliding and global layers with a
window shorter than the test windows, Phi-3's fused layers, OPT's biases and learned positions,
GPT-NeoX's per-head fused QKV, partial rotary (with the bias that keeps IRC attention on the reference
path, and without it) and parallel residual, Mistral's sliding window; Bloom has no table entry.
"""

from __future__ import annotations

import torch
from torch import nn

GPT2_VOCAB = 50257  # the GPT-2 tokenizer of the shared data, which every tiny model is paired with


def family_config(name: str, vocab: int = GPT2_VOCAB, layers: int = 2):
    from transformers import (
        BloomConfig,
        Gemma3TextConfig,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Phi3Config,
        Qwen3Config,
    )

    c = dict(num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, max_position_embeddings=128,
             vocab_size=vocab)
    configs = {
        # SmolLM2's shape in small: grouped-query attention with three query heads per key/value head, tied head
        "llama": lambda: LlamaConfig(**{**c, "num_attention_heads": 6, "hidden_size": 48}, intermediate_size=64,
                                     num_key_value_heads=2,
                                     head_dim=8, tie_word_embeddings=True),
        "qwen3": lambda: Qwen3Config(**c, intermediate_size=64, num_key_value_heads=2, head_dim=8,
                                     tie_word_embeddings=False),
        "gemma3_text": lambda: Gemma3TextConfig(**c, intermediate_size=64, num_key_value_heads=2, head_dim=8,
                                                sliding_window=8, query_pre_attn_scalar=8,
                                                layer_types=["sliding_attention", "full_attention"] * (layers // 2)),
        "phi3": lambda: Phi3Config(**c, intermediate_size=64, num_key_value_heads=2, pad_token_id=0),
        "opt": lambda: OPTConfig(**c, ffn_dim=64, word_embed_proj_dim=32, pad_token_id=0),
        "gpt_neox": lambda: GPTNeoXConfig(**c, intermediate_size=64, rotary_pct=0.25),
        "gpt_neox_nobias": lambda: GPTNeoXConfig(**c, intermediate_size=64, rotary_pct=0.5, attention_bias=False),
        "mistral": lambda: MistralConfig(**c, intermediate_size=64, num_key_value_heads=2, sliding_window=8),
        "bloom": lambda: BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=vocab),
    }
    return configs[name]()


FAMILIES = ["qwen3", "gemma3_text", "phi3", "opt", "gpt_neox", "gpt_neox_nobias", "mistral"]  # with table entries


def family_model(name: str, vocab: int = GPT2_VOCAB, seed: int = 0, layers: int = 2) -> nn.Module:
    """A tiny random model of family `name`; weights N(0, 0.3), so attention is far from uniform."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    attn = "eager" if name == "bloom" else "sdpa"  # Bloom has no SDPA attention
    model = AutoModelForCausalLM.from_config(family_config(name, vocab, layers), attn_implementation=attn)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def gguf_ready_model(name: str, vocab: int = GPT2_VOCAB, seed: int = 0) -> nn.Module:
    """A tiny random Llama, Qwen 3 or Gemma 3 in the settings GGUF readers assume and a GGUF file does
    not carry (Qwen 3's heads of 128; Gemma 3's heads and query scale of 256, five local layers to one
    global); norms random too (Gemma's are written as 1 + w)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen3Config

    c = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=vocab,
             max_position_embeddings=256)
    make = {"llama": lambda: LlamaConfig(**c, num_hidden_layers=2, tie_word_embeddings=True),
            "qwen3": lambda: Qwen3Config(**c, num_hidden_layers=2, head_dim=128),
            "gemma3_text": lambda: Gemma3TextConfig(**c, num_hidden_layers=6, head_dim=256, sliding_window=8)}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make[name]()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 2 else 0.1)
    return model

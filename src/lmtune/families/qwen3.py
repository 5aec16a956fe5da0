"""Qwen3 (0.6B to 32B dense): Qwen2's layers without the q/k/v biases, with an RMSNorm over each head's queries
and keys (q_norm, k_norm) before the rotary embedding."""

from __future__ import annotations

from .qwen2 import Qwen2


class Qwen3(Qwen2):
    name = "Qwen3"
    architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)
    # The converter's Qwen3Model is its Qwen2Model with the "qwen3" architecture (conversion/qwen.py): the same keys
    # (key_length/value_length when head_dim is not hidden_size / heads, as in Qwen3-0.6B: 128 against 1024 / 16),
    # tensors renamed only. q_norm and k_norm are plain RMSNorm weights per head dimension, which llama.cpp's qwen3
    # graph applies to each head before rope (attn_q_norm, attn_k_norm), so they are written as they are; NEOX rope
    # as for Qwen2, so no permutation. Qwen3 publishes Qwen2.5's vocabulary ("qwen2" pre-tokenizer, Qwen2's entry).
    gguf_architecture = "qwen3"
    pre_tokenizers = {}


QWEN3 = Qwen3()

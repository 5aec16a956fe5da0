"""Qwen2 and Qwen2.5: Llama-style layers with biases on q/k/v, NEOX rope (no Q/K permutation)."""

from __future__ import annotations

from .base import RmsFamily


class Qwen2(RmsFamily):
    name = "Qwen2/Qwen2.5"
    architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)
    # The converter's Qwen2Model: TextModel's keys as they are, and tensors renamed only (llama.cpp runs Qwen2 with
    # NEOX rope, the Hugging Face rotate_half convention, so q/k are not permuted; the q/k/v biases map by name).
    gguf_architecture = "qwen2"
    pre_tokenizers = {"e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2"}  # Qwen/Qwen1.5-7B


QWEN2 = Qwen2()

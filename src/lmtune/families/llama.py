"""Llama (Llama 2/3.x, SmolLM/SmolLM2, TinyLlama) and Mistral, which llama.cpp runs as the same "llama"
architecture (its converter registers MistralForCausalLM under LlamaModel)."""

from __future__ import annotations

import math

import torch

from .base import RmsFamily, head_dim, rope_parameters, rope_theta, rope_type


def llama_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """The converter's LlamaModel.permute, verbatim in effect.

    Hugging Face checkpoints store each head's q/k rows rotated as [first halves; second halves] (the
    `rotate_half` convention); llama.cpp's LLAMA rope pairs adjacent rows (GPT-J style). Interleaving the
    two halves of every head makes the same rotation come out; transformers' GGUF reader undoes it on load.
    Families llama.cpp runs with NEOX rope (Qwen2, Qwen3, Gemma 3), the Hugging Face convention, are not permuted.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def llama3_rope_factors(config) -> torch.Tensor | None:
    """The per-frequency divisors of Llama 3.1's rope scaling, or None when the model has no "llama3" scaling.

    Mirrors llama.cpp's converter, LlamaModel.generate_extra_tensors (conversion/llama.py in llama.cpp as vendored
    by llama-cpp-python 0.3.36): llama.cpp has no "llama3" rope scaling type and no key for its parameters; it
    divides each rotary frequency by a factor read from the `rope_freqs.weight` tensor (fp32, head_dim / 2 values),
    which the converter computes here from rope_scaling: 1 for wavelengths below original_max_position_embeddings /
    high_freq_factor, `factor` above original_max_position_embeddings / low_freq_factor, and the smooth blend between.
    The same defaults as the converter (factor 8, low 1, high 4, original context 8192, theta 10000) when a key is
    missing. Without this tensor llama.cpp runs the model with unscaled frequencies: it loads, and is wrong.
    """
    if rope_type(config) != "llama3":
        return None
    params = rope_parameters(config)
    base = rope_theta(config) or 10000.0
    dim = head_dim(config)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low_freq_factor = params.get("low_freq_factor", 1.0)
    high_freq_factor = params.get("high_freq_factor", 4.0)
    old_context_len = params.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


class Llama(RmsFamily):
    name = "Llama (incl. SmolLM2), Mistral"
    architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    model_types = ("llama", "mistral")
    gguf_architecture = "llama"
    # "llama3" (Llama 3.1, 3.2, 3.3) is written for this family only: llama.cpp's converter makes its rope_freqs
    # tensor in LlamaModel (which Mistral uses too), not in Qwen2Model.
    gguf_rope_types = ("default", "linear", "llama3")
    pre_tokenizers = {
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # HuggingFaceTB/SmolLM-135M (and SmolLM2)
        "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
        "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",     # mistralai/Mistral-Nemo-Base-2407
    }

    def gguf_parameters(self, config):
        # LlamaModel.set_gguf_parameters adds the vocabulary size and the rope dimension to TextModel's keys. "llama3"
        # rope writes no rope.scaling key at all (its factors travel as the rope_freqs tensor), and the context
        # length stays max_position_embeddings (131072 for Llama 3.1-3.3), as the converter writes it.
        return super().gguf_parameters(config) + [("vocab_size", config.vocab_size),
                                                  ("rope_dimension_count", head_dim(config))]

    def gguf_tensor(self, name, data, config):
        n_head = config.num_attention_heads
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            data = llama_permute(data, n_head, n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            data = llama_permute(data, n_head, getattr(config, "num_key_value_heads", None) or n_head)
        return name, data

    def gguf_extra_tensors(self, config):
        if (factors := llama3_rope_factors(config)) is not None:
            import gguf

            yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors


LLAMA = Llama()

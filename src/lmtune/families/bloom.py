"""BLOOM (bigscience/bloom-560m and its family): ALiBi instead of position ids, LayerNorm, one fused QKV."""

from __future__ import annotations

import torch

from .base import Family


def bloom_qkv(data: torch.Tensor, n_head: int, n_embed: int) -> torch.Tensor:
    """The converter's BloomModel.modify_tensors for query_key_value (weight or bias).

    Hugging Face BLOOM interleaves the fused projection per head, [q0 k0 v0 q1 k1 v1 ...]; llama.cpp
    splits the fused output GPT-2 style into three contiguous blocks [all q, all k, all v].
    """
    head = n_embed // n_head
    if data.dim() == 2:
        qkv = data.reshape(n_head, 3, head, n_embed)
        return torch.cat([qkv[:, i].reshape(-1, n_embed) for i in range(3)], dim=0)
    qkv = data.reshape(n_head, 3, head)
    return torch.cat([qkv[:, i].reshape(n_embed) for i in range(3)], dim=0)


class Bloom(Family):
    name = "BLOOM"
    architectures = ("BloomForCausalLM",)
    model_types = ("bloom",)
    takes_position_ids = False  # ALiBi: the biases come from the attention mask
    norm = "layer"
    layer_count_fields = ("n_layer",)
    gguf_architecture = "bloom"
    pre_tokenizers = {"3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom"}  # bigscience/bloom

    def compile_pays(self, config) -> bool:
        # BLOOM's layers (LayerNorm, one fused GeLU) measured no gain from compiling (bench/train_shapes.py's
        # lmtune-eager row), so they do not pay for the compile.
        return False

    def gguf_parameters(self, config) -> list[tuple[str, object]]:
        # The converter's BloomModel.set_gguf_parameters: BLOOM (ALiBi) has no position limit of its own; the
        # converter writes seq_length, or the embedding width when the config has none.
        n_embed = config.hidden_size
        return [("context_length", getattr(config, "seq_length", None) or n_embed), ("embedding_length", n_embed),
                ("feed_forward_length", 4 * n_embed), ("block_count", config.n_layer), ("head_count", config.n_head),
                ("head_count_kv", config.n_head), ("layer_norm_eps", config.layer_norm_epsilon)]

    def gguf_tensor(self, name, data, config):
        name = name.removeprefix("transformer.")
        if name.endswith(("self_attention.query_key_value.weight", "self_attention.query_key_value.bias")):
            data = bloom_qkv(data, config.n_head, config.hidden_size)
        return name, data


BLOOM = Bloom()

"""Gemma 3 text models (Gemma3ForCausalLM: 270M, 1B): RMSNorm computing x * (1 + w), the embedding scaled by
sqrt(hidden), five sliding-window layers to one global layer, q/k RMSNorm, and a pre- and post-norm around both the
attention and the MLP."""

from __future__ import annotations

from .base import RmsFamily, head_dim

# llama.cpp's loader (llama-model.cpp, LLM_ARCH_GEMMA3) fixes what no GGUF key carries: set_swa_pattern(6) (every
# sixth layer global, the others sliding-window), rope_freq_base_train_swa = 10000 with no scaling on the sliding
# layers, and an attention scale of 1 / sqrt(head_dim) (hidden / heads for the 62-layer 27B only).
SWA_PATTERN = 6
SLIDING_ROPE_THETA = 10000.0


def _rope(config, layer_type: str) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get(layer_type, params) if isinstance(params, dict) else {}


class Gemma3(RmsFamily):
    name = "Gemma 3 (text)"
    architectures = ("Gemma3ForCausalLM",)
    model_types = ("gemma3_text",)
    gguf_architecture = "gemma3"

    def gguf_problem(self, config) -> str | None:
        """What llama.cpp's gemma3 graph would compute differently from transformers, said before anything loads."""
        expected = ["sliding_attention" if i % SWA_PATTERN < SWA_PATTERN - 1 else "full_attention"
                    for i in range(config.num_hidden_layers)]
        if list(getattr(config, "layer_types", None) or expected) != expected:
            return (f"GGUF export: llama.cpp runs Gemma 3 with every {SWA_PATTERN}th layer global and the others "
                    f"sliding-window; this model's layer_types are {config.layer_types}")
        sliding, full = _rope(config, "sliding_attention"), _rope(config, "full_attention")
        if sliding.get("rope_type", "default") != "default" or float(sliding.get("rope_theta", 0)) != SLIDING_ROPE_THETA:
            return (f"GGUF export: llama.cpp runs Gemma 3's sliding-window layers with rope theta {SLIDING_ROPE_THETA:g} "
                    f"unscaled; this model has {sliding}")
        if full.get("rope_type", "default") not in ("default", "linear"):
            return f"GGUF export does not support rope scaling '{full['rope_type']}' yet (model type gemma3_text)"
        if getattr(config, "query_pre_attn_scalar", None) != head_dim(config):
            return (f"GGUF export: llama.cpp scales Gemma 3's attention by 1/sqrt(head_dim = {head_dim(config)}); this "
                    f"model's query_pre_attn_scalar is {config.query_pre_attn_scalar}")
        if getattr(config, "attn_logit_softcapping", None) is not None:
            # The converter's Gemma3Model.set_gguf_parameters asserts it away: Gemma 3 removed it.
            return "GGUF export: llama.cpp's gemma3 has no attention logit soft-capping, which this model sets"
        return None

    def gguf_parameters(self, config):
        # The converter's Gemma3Model.set_gguf_parameters: TextModel's keys, then head_dim as key and value length
        # always, the global layers' rope theta (the sliding layers' is fixed in llama.cpp), the final logit
        # soft-cap when set, and the sliding window.
        params = [(key, value) for key, value in super().gguf_parameters(config)
                  if key not in ("rope_freq_base", "rope_scaling_type", "rope_scaling_factor", "key_length", "value_length")]
        full = _rope(config, "full_attention")
        params += [("key_length", head_dim(config)), ("value_length", head_dim(config)),
                   ("rope_freq_base", float(full.get("rope_theta", 1_000_000.0)))]
        if full.get("rope_type") == "linear":
            # TextModel.set_gguf_parameters writes linear scaling as a type and a factor; llama.cpp applies it to the
            # global layers only (rope_freq_scale_train_swa = 1), as transformers does.
            import gguf

            params += [("rope_scaling_type", gguf.RopeScalingType.LINEAR), ("rope_scaling_factor", full["factor"])]
        if (softcap := getattr(config, "final_logit_softcapping", None)):
            params.append(("final_logit_softcapping", softcap))
        if getattr(config, "sliding_window", None):
            params.append(("sliding_window", config.sliding_window))
        return params

    def gguf_tensor(self, name, data, config):
        # The converter's Gemma3Model.norm_shift / modify_tensors: Gemma3RMSNorm computes x * (1 + w) and stores w;
        # llama.cpp's RMSNorm multiplies by the stored weight, so every norm weight (input, post-attention,
        # pre- and post-feedforward, q/k and the final norm) is written as 1 + w. transformers' GGUF reader subtracts
        # the 1 again on load (Gemma2TensorProcessor).
        if name.endswith("norm.weight"):
            data = data + 1
        # The embedding is written unscaled: Gemma3TextScaledWordEmbedding multiplies it by sqrt(hidden_size) in the
        # forward, and llama.cpp's gemma3 graph does the same to its input embeddings. The converter also cuts
        # token_embd to the tokenizer's size; here every embedding row keeps a token (vocab.py pads the vocabulary
        # with unused "[PAD<id>]" tokens instead), so nothing is cut.
        return name, data


GEMMA3 = Gemma3()

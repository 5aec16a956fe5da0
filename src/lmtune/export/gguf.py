"""Write a merged model as a GGUF file that llama.cpp, Ollama and LM Studio load: pure Python, no compiler.

llama.cpp's own converter (`convert_hf_to_gguf.py` and its `conversion/` package, in the llama.cpp
repository) is not on PyPI; the `gguf` package has its writer, tensor-name maps and quantizers. What the
converter does beyond renaming, this module does the same way, with a comment at each place naming the
converter behaviour mirrored (checked against llama.cpp as vendored by llama-cpp-python 0.3.36):

* which tensors stay f32 (1-D tensors and norms), and which quant type the others get;
* the Q/K row permutation of Llama-family attention (`LlamaModel.permute`);
* BLOOM's fused query_key_value rows regrouped from per-head [q,k,v] to [all q, all k, all v];
* the hyperparameter keys per architecture, and the vocabulary (`get_vocab_base`);
* the pre-tokenizer name (`get_vocab_base_pre`), found by hashing the tokenizer's ids on the converter's
  test string;
* SentencePiece vocabularies (Llama 2, Mistral v0.1 to v0.3, TinyLlama) as llama.cpp's "llama" tokenizer
  (`_set_vocab_sentencepiece` / `_create_vocab_sentencepiece`, and `_set_vocab_llama_hf` without tokenizer.model).
* Llama 3.1/3.2/3.3's "llama3" rope scaling as the `rope_freqs.weight` tensor (`LlamaModel.generate_extra_tensors`).

The file also carries the prompt template the model was trained with (see `plain_chat_template`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch

from ..data.template import PromptTemplate
from ..errors import LmtuneError

# config.model_type -> llama.cpp architecture. Mistral is a Llama to llama.cpp (its converter registers
# MistralForCausalLM under LlamaModel); transformers' GGUF reader loads all four back, which is what lets
# every export be verified. Other architectures are refused before anything is loaded.
ARCHITECTURES = {"bloom": "bloom", "llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
SUPPORTED_TEXT = "BLOOM, Llama (incl. SmolLM2), Mistral, Qwen2/Qwen2.5"

# Quant types written here in pure Python (gguf.quants), and the k-quants only llama.cpp's quantizer makes.
PYTHON_QUANTS = ("f32", "f16", "bf16", "q8_0")
LLAMA_CPP_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
QUANTS = PYTHON_QUANTS + LLAMA_CPP_QUANTS


class ExportError(LmtuneError):
    """The model cannot be exported (unsupported architecture, tokenizer, quant type) or failed its check."""


def gguf_architecture(model_type: str) -> str:
    if model_type not in ARCHITECTURES:
        raise ExportError(f"GGUF export does not support model type '{model_type}'; supported: {SUPPORTED_TEXT}")
    return ARCHITECTURES[model_type]


def _rope_params(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params if isinstance(params, dict) else {}


def rope_type(config) -> str:
    params = _rope_params(config)
    return str(params.get("rope_type", params.get("type", "default")) or "default").lower()


def check_rope(config) -> None:
    """Refuse rope scaling this writer does not reproduce (yarn, longrope, dynamic...). "llama3" (Llama 3.1, 3.2,
    3.3) is written for the Llama family only: llama.cpp's converter makes its rope_freqs tensor in LlamaModel
    (which Mistral uses too), not in Qwen2Model."""
    kind = rope_type(config)
    supported = ("default", "linear", "llama3") if ARCHITECTURES.get(config.model_type) == "llama" else ("default", "linear")
    if kind not in supported:
        raise ExportError(f"GGUF export does not support rope scaling '{kind}' yet (model type {config.model_type}); "
                          f"supported: none, {', '.join(supported[1:])}")


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
    params = _rope_params(config)
    base = _rope_theta(config) or 10000.0
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
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


# ---------------------------------------------------------------- the file


@dataclass
class WrittenGguf:
    path: Path
    architecture: str
    quant: str
    pre_tokenizer: str
    chat_template: str
    tensors: int


def write_gguf(model, tokenizer, template: PromptTemplate, path: Path, quant: str, name: str) -> WrittenGguf:
    """Write `model` (a float transformers model) with its tokenizer and chat template to `path` in one of
    PYTHON_QUANTS. The caller makes the write atomic."""
    import gguf

    if quant not in PYTHON_QUANTS:
        raise ExportError(f"quant type '{quant}' is not written in Python; choose one of {', '.join(PYTHON_QUANTS)}")
    config = model.config
    arch = gguf_architecture(config.model_type)
    check_rope(config)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(_file_type(quant))
    _add_hyperparameters(writer, config, arch)
    pre = _add_vocabulary(writer, tokenizer, config.vocab_size)
    chat_template = gguf_chat_template(template, tokenizer)
    writer.add_chat_template(chat_template)
    count = _add_tensors(writer, model, arch, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return WrittenGguf(Path(path), arch, quant, pre, chat_template, count)


def _file_type(quant: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]


def _rope_theta(config) -> float | None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None else None


def _add_hyperparameters(writer, config, arch: str) -> None:
    if arch == "bloom":
        # Mirrors the converter's BloomModel.set_gguf_parameters: BLOOM (ALiBi) has no position limit of its
        # own; the converter writes seq_length, or the embedding width when the config has none.
        n_embed = config.hidden_size
        writer.add_context_length(getattr(config, "seq_length", None) or n_embed)
        writer.add_embedding_length(n_embed)
        writer.add_feed_forward_length(4 * n_embed)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_head_count_kv(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    # Llama family: TextModel.set_gguf_parameters plus LlamaModel's vocab size and rope dimension.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if (theta := _rope_theta(config)) is not None:
        writer.add_rope_freq_base(theta)
    # Mirrors the converter's TextModel.set_gguf_parameters: linear scaling is a type and a factor; "llama3" writes no
    # rope.scaling key at all (its factors travel as the rope_freqs tensor, see llama3_rope_factors), and the
    # context length stays max_position_embeddings (131072 for Llama 3.1-3.3), as the converter writes it.
    if rope_type(config) == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(_rope_params(config)["factor"])
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


# ---------------------------------------------------------------- tensors


def llama_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """The converter's LlamaModel.permute, verbatim in effect.

    Hugging Face checkpoints store each head's q/k rows rotated as [first halves; second halves] (the
    `rotate_half` convention); llama.cpp's LLAMA rope pairs adjacent rows (GPT-J style). Interleaving the
    two halves of every head makes the same rotation come out; transformers' GGUF reader undoes it on load.
    Qwen2 is not permuted: llama.cpp runs it with NEOX rope, the Hugging Face convention.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


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


def _gguf_tensors(model, arch: str):
    """(llama.cpp name, float32 tensor) for every weight the file needs, transformed like the converter does."""
    import gguf

    config = model.config
    blocks = config.n_layer if arch == "bloom" else config.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BLOOM if arch == "bloom" else
                                     gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA, blocks)
    state = model.state_dict()
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    for hf_name, tensor in state.items():
        # A tied output head is the embedding matrix again: the converter writes it once (the checkpoint holds
        # it once), and llama.cpp falls back to token_embd when `output.weight` is missing.
        if output is not None and hf_name.endswith("lm_head.weight") and output.weight.data_ptr() == embedding.data_ptr():
            continue
        if hf_name.endswith((".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")):
            continue  # buffers the converter drops too
        data = tensor.detach().to(torch.float32).cpu()
        name = hf_name
        if arch == "bloom":
            name = name.removeprefix("transformer.")
            if name.endswith("self_attention.query_key_value.weight") or name.endswith("self_attention.query_key_value.bias"):
                data = bloom_qkv(data, config.n_head, config.hidden_size)
        elif arch == "llama":
            n_head = config.num_attention_heads
            n_kv = getattr(config, "num_key_value_heads", None) or n_head
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                data = llama_permute(data, n_head, n_head)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                data = llama_permute(data, n_head, n_kv)
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"GGUF export: no llama.cpp name for tensor '{hf_name}' of {type(model).__name__}")
        yield new_name, data
    if arch == "llama" and (factors := llama3_rope_factors(config)) is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors


def _tensor_qtype(new_name: str, data: np.ndarray, quant: str):
    """The converter's choice in prepare_tensors: 1-D tensors and norms stay f32 (llama.cpp's kernels for them
    take f32 only), every other `.weight` gets the file's type."""
    import gguf

    if data.ndim <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]


def _add_tensors(writer, model, arch: str, quant: str) -> int:
    import gguf

    count = 0
    for new_name, data_torch in _gguf_tensors(model, arch):
        data = data_torch.numpy()
        qtype = _tensor_qtype(new_name, data, quant)
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:
            # As the converter: a row length q8_0's 32-value blocks do not divide falls back to f16.
            qtype = gguf.GGMLQuantizationType.F16
            packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(new_name, packed, raw_dtype=qtype)
        count += 1
    return count


# ---------------------------------------------------------------- vocabulary

# The converter's test string (get_vocab_base_pre): tokenizing it and hashing the ids identifies the
# pre-tokenizer (the regex that splits text before BPE), which llama.cpp re-implements by name.
CHECK_TEXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'

# hash -> llama.cpp pre-tokenizer name: the entries of the converter's get_vocab_base_pre for the models this
# exporter supports (copied from llama.cpp; the converter's table is generated by convert_hf_to_gguf_update.py).
KNOWN_PRE_TOKENIZERS = {
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",      # bigscience/bloom
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # HuggingFaceTB/SmolLM-135M (and SmolLM2)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",      # Qwen/Qwen1.5-7B (Qwen2, Qwen2.5)
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",     # mistralai/Mistral-Nemo-Base-2407
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",      # openai-community/gpt2
}


# Split regexes as tokenizer.json spells them -> the llama.cpp pre-tokenizer implementing the same split
# (llama.cpp's llama-vocab.cpp regexes for these names; transformers' GGUF reader maps the names back to these).
SPLIT_REGEX_PRE_TOKENIZERS = {
    # Qwen2 / Qwen2.5 (transformers' Qwen2Tokenizer PRETOKENIZE_REGEX): single digits
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    # Llama 3: digits in groups of up to three
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    # BLOOM
    r" ?[^(\s|[.,!?…。，、।۔،])]+": "bloom",
}


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; without the right one llama.cpp warns
    "GENERATION QUALITY WILL BE DEGRADED" and splits text differently from training."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest]
    # Not a published vocabulary the table knows (e.g. a tokenizer trained or extended for this model): name the
    # split by its rule instead. A lone ByteLevel pre-tokenizer with its regex is GPT-2's split exactly ("gpt-2");
    # a Split by one of the regexes below, then ByteLevel without its own regex, is that model family's split.
    pre = _backend(tokenizer).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern in SPLIT_REGEX_PRE_TOKENIZERS:
            return SPLIT_REGEX_PRE_TOKENIZERS[pattern]
    raise ExportError(f"GGUF export: the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}, test-string hash {digest}) "
                      "is not one llama.cpp knows; llama.cpp would split text differently from training")


def _backend(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"GGUF export needs a fast (tokenizers) tokenizer; {type(tokenizer).__name__} is not one")
    return json.loads(backend.to_str())


def _has(node, test) -> bool:
    if isinstance(node, dict):
        return test(node) or any(_has(v, test) for v in node.values())
    if isinstance(node, list):
        return any(_has(v, test) for v in node)
    return False


def _is_byte_level(spec: dict) -> bool:
    def byte_level(node: dict) -> bool:
        return node.get("type") == "ByteLevel"

    return spec.get("model", {}).get("type") == "BPE" and _has(spec.get("pre_tokenizer"), byte_level) and _has(spec.get("decoder"), byte_level)


def _spaces_as_metaspace(node: dict) -> bool:
    # SentencePiece's "▁" for spaces: transformers' converted Llama tokenizers use a Metaspace pre-tokenizer
    # (transformers 5) or a Replace(" ", "▁") normalizer (the tokenizer.json files of Llama 2 and Mistral).
    return node.get("type") == "Metaspace" or (node.get("type") == "Replace" and node.get("content") == "\u2581")


def _is_sentencepiece_bpe(spec: dict) -> bool:
    """A SentencePiece BPE vocabulary as transformers holds it: BPE over characters with byte fallback (<0x0A>)
    and spaces spelled "▁". llama.cpp's "llama" tokenizer runs exactly this algorithm; it has none that
    reproduces a SentencePiece Unigram model (T5-style) in its "llama" type."""
    model = spec.get("model", {})
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback"))
            and (_has(spec.get("pre_tokenizer"), _spaces_as_metaspace) or _has(spec.get("normalizer"), _spaces_as_metaspace)))


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text, as llama.cpp's tokenizer.ggml.add_space_prefix says."""
    def prefixing(node: dict) -> bool:
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never") != "never"
        return node.get("type") == "Prepend" and node.get("prepend") == "\u2581"

    return _has(spec.get("pre_tokenizer"), prefixing) or _has(spec.get("normalizer"), prefixing)


def sentencepiece_space_prefix(tokenizer) -> bool | None:
    """None for a tokenizer exported as a byte-level BPE; for a SentencePiece one, whether it puts "▁" before text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    return _adds_space_prefix(spec) if _is_sentencepiece_bpe(spec) else None


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and (ids[0] if first else ids[-1]) == token_id


def _looks_special(token: str) -> bool:
    """The converter's does_token_look_special: added tokens some models forget to flag special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def _add_vocabulary(writer, tokenizer, vocab_size: int) -> str:
    """Tokens, types, merges (or scores), special ids: the converter's get_vocab_base + SpecialVocab, from the
    loaded tokenizer (the one training used) rather than from files in a folder. Returns the pre-tokenizer name."""
    import gguf

    spec = _backend(tokenizer)
    sentencepiece = _is_sentencepiece_bpe(spec)
    if not sentencepiece and not _is_byte_level(spec):
        model = spec.get("model", {})
        kind = "SentencePiece Unigram (T5-style)" if model.get("type") == "Unigram" else \
            f"{model.get('type')}{' without byte fallback' if model.get('type') == 'BPE' else ''}"
        raise ExportError(f"GGUF export supports byte-level BPE tokenizers (BLOOM, SmolLM2, Qwen2, Llama 3) and SentencePiece "
                          f"BPE ones (Llama 2, Mistral v0.1-v0.3, TinyLlama); this one is {kind}, which llama.cpp's tokenizers "
                          "would not split as training did")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())} but the model only "
                          f"{vocab_size} embedding rows")
    if sentencepiece:
        pre = "default"
        tokens, scores, types = _sentencepiece_vocabulary(tokenizer, spec, vocab_size)
        # Mirrors the converter's _set_vocab_sentencepiece: model "llama", pre-tokenizer "default", scores, no merges
        # (llama.cpp's "llama" tokenizer merges by token score). add_space_prefix is written as the tokenizer does it
        # (LlamaModel.set_vocab writes it from tokenizer_config.json's add_prefix_space when that is set).
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(spec))
    else:
        pre = pre_tokenizer_name(tokenizer)
        tokens, types = _byte_level_vocabulary(tokenizer, vocab, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        merges = spec["model"].get("merges") or []
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for kind, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # Written explicitly: llama.cpp's default (BOS on for SentencePiece, per model for BPE) would otherwise decide
    # whether a BOS starts every prompt, and a BOS training never saw (or a missing one) changes every answer.
    writer.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id, first=True))
    writer.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, first=False))
    return pre


def _byte_level_vocabulary(tokenizer, vocab: dict[str, int], vocab_size: int):
    import gguf

    reverse = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in reverse:  # embedding rows beyond the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[index]
        if index in added:
            looks_special = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if added[index].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _sentencepiece_model(tokenizer, pieces: dict[str, int]):
    """The tokenizer's own SentencePiece model file (tokenizer.model, beside a Llama 2 or Mistral checkpoint), loaded,
    if there is one, the `sentencepiece` package is installed, and its pieces are the tokenizer's (ids included)."""
    candidates = [getattr(tokenizer, "vocab_file", None), tokenizer.init_kwargs.get("vocab_file")]
    if tokenizer.name_or_path:
        candidates.append(Path(tokenizer.name_or_path) / "tokenizer.model")
    path = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if path is None:
        return None
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        return None  # the scores are rebuilt from the merges instead, and the check proves the tokenization
    model = SentencePieceProcessor()
    try:
        model.LoadFromFile(str(path))
    except (OSError, RuntimeError):
        return None
    same = all(pieces.get(model.IdToPiece(i), i) == i for i in range(model.vocab_size()))
    return model if same and model.vocab_size() <= len(pieces) else None


def _sentencepiece_vocabulary(tokenizer, spec: dict, vocab_size: int):
    """(tokens, scores, types) of a SentencePiece BPE vocabulary, as the converter's _create_vocab_sentencepiece makes
    them from tokenizer.model: rows without a token are "[PAD<id>]" (UNUSED, score -10000); each piece has its score
    and its type (UNKNOWN, CONTROL, UNUSED, BYTE for "<0x0A>"-style byte pieces, NORMAL); then every added token of the
    tokenizer (transformers' added_tokens_decoder, which is what the converter reads from tokenizer_config.json)
    overrides its row with score -1000, as CONTROL when special (or looking special), else USER_DEFINED with "▁"
    spelled as a space.

    Without tokenizer.model (transformers 5 saves tokenizer.json only, so every folder lmtune merges has none),
    the converter falls back to _set_vocab_llama_hf (gguf's LlamaHfVocab), which gives every token the score -1000.
    That is not followed here: llama.cpp's "llama" tokenizer merges the adjacent pair whose joined token scores
    highest, so equal scores would merge left to right. Each token's score is instead minus the rank of the first
    merge that makes it: the order in which transformers' BPE (and SentencePiece, whose merges transformers built
    from these very scores) makes tokens. The export's llama.cpp check proves the result tokenizes like training.
    """
    import gguf

    pieces: dict[str, int] = spec["model"]["vocab"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    model = _sentencepiece_model(tokenizer, pieces)
    if model is not None:
        for i in range(min(model.vocab_size(), vocab_size)):
            tokens[i], scores[i] = model.IdToPiece(i), model.GetScore(i)
            types[i] = (gguf.TokenType.UNKNOWN if model.IsUnknown(i) else gguf.TokenType.CONTROL if model.IsControl(i)
                        else gguf.TokenType.UNUSED if model.IsUnused(i) else gguf.TokenType.BYTE if model.IsByte(i)
                        else gguf.TokenType.NORMAL)
    else:
        merges = spec["model"].get("merges") or []
        rank: dict[str, int] = {}
        for number, merge in enumerate(merges):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            rank.setdefault(left + right, number)
        specials = set(tokenizer.all_special_ids)
        for piece, i in pieces.items():
            tokens[i] = piece
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                types[i], scores[i] = gguf.TokenType.BYTE, 0.0
            elif i == tokenizer.unk_token_id:
                types[i], scores[i] = gguf.TokenType.UNKNOWN, 0.0
            elif i in specials:
                types[i], scores[i] = gguf.TokenType.CONTROL, 0.0
            else:
                # Single characters are never a merge's result; below every merged token, they are never preferred.
                types[i], scores[i] = gguf.TokenType.NORMAL, -float(rank.get(piece, len(merges)))
    for i, added in tokenizer.added_tokens_decoder.items():
        token = added.content
        if added.special or _looks_special(token):
            types[i] = gguf.TokenType.CONTROL
        else:
            token = token.replace("\u2581", " ")  # the converter pre-normalizes user-defined spaces
            types[i] = gguf.TokenType.USER_DEFINED
        scores[i] = -1000.0
        tokens[i] = token
    return tokens, scores, types


# ---------------------------------------------------------------- the prompt template


def _jinja_literal(text: str) -> str:
    # JSON string syntax is a valid Jinja string literal (\n, \", \\ escapes), in Python's jinja2 and llama.cpp's.
    return json.dumps(text, ensure_ascii=False)


def adds_bos(tokenizer) -> bool:
    return _adds(tokenizer, tokenizer.bos_token_id, first=True)


def gguf_chat_template(template: PromptTemplate, tokenizer) -> str:
    """The Jinja chat template to store in the file: the model's own for chat-template models (with lmtune's
    system prompt as the default system message), or `plain_chat_template` for lmtune's plain template."""
    if template.kind == "chat":
        chat = template.chat_template or tokenizer.chat_template
        if not template.system_prompt:
            return chat
        default = _jinja_literal(template.system_prompt)
        return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
                f"{{%- set messages = [{{'role': 'system', 'content': {default}}}] + messages -%}}"
                "{%- endif -%}" + chat)
    return plain_chat_template(template, adds_bos(tokenizer))


def plain_chat_template(template: PromptTemplate, add_bos: bool) -> str:
    """A Jinja chat template that renders exactly what lmtune trains on and prompts with (conversation_ids):

        [system prompt + "\\n"] "Human: " question "\\nAssistant:" " " answer EOS "Human: " question2 ...

    The system prompt (a system message, else the template's own) goes before the first question only; each
    answer ends with EOS. A runtime adds BOS at the very start itself when the vocabulary asks for it, so the
    template writes BOS only before later turns (where lmtune's tokenizer adds one to every turn).
    The prompt already ends with "Assistant:" after every user message: that is the generation prompt.
    """
    before, _, after = template.prompt.partition("{question}")
    bos = "{{- bos_token -}}" if add_bos else ""
    return (
        f"{{%- set ns = namespace(system={_jinja_literal(template.system_prompt)}, turn=0) -%}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}"
        "{%- elif message['role'] == 'user' -%}"
        f"{{%- if ns.turn > 0 -%}}{bos}{{%- elif ns.system -%}}{{{{- ns.system + \"\\n\" -}}}}{{%- endif -%}}"
        f"{{{{- {_jinja_literal(before)} + message['content'] + {_jinja_literal(after)} -}}}}"
        "{%- set ns.turn = ns.turn + 1 -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{- {_jinja_literal(template.answer_prefix)} + message['content'] + eos_token -}}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )

"""Write a merged model as a GGUF file that llama.cpp, Ollama and LM Studio load: pure Python, no compiler.

llama.cpp's own converter (`convert_hf_to_gguf.py` and its `conversion/` package, in the llama.cpp
repository) is not on PyPI; the `gguf` package has its writer, tensor-name maps and quantizers. What the
converter does per architecture (hyperparameter keys, tensor transforms, extra tensors) is each family's own
module in `lmtune.families`, with a comment at each place naming the converter behaviour mirrored; this module
is the converter's shared machinery (checked against llama.cpp as vendored by llama-cpp-python 0.3.36):

* which family writes the file, and one clear refusal naming the supported ones for the others;
* which tensors stay f32 (1-D tensors and norms), and which quant type the others get;
* tied output heads and buffers left out, and the family's tensors renamed through gguf's tensor map.

The vocabulary is `vocab.py`'s job and the chat template (the prompt the model was trained with)
`chat_templates.py`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.template import PromptTemplate
from ..families import Family, family_of, supported_gguf
from .chat_templates import gguf_chat_template
from .errors import ExportError
from .vocab import add_vocabulary

# Quant types written here in pure Python (gguf.quants), and the k-quants only llama.cpp's quantizer makes.
PYTHON_QUANTS = ("f32", "f16", "bf16", "q8_0")
LLAMA_CPP_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
QUANTS = PYTHON_QUANTS + LLAMA_CPP_QUANTS


def gguf_family(config) -> Family:
    """The family that writes `config`'s model, or ExportError naming the supported ones. transformers' GGUF reader
    loads every supported architecture back, which is what lets every export be verified."""
    family = family_of(config)
    if family is None or family.gguf_architecture is None:
        raise ExportError(f"GGUF export does not support model type '{config.model_type}'; supported: {supported_gguf()}")
    return family


def check_exportable(config) -> Family:
    """Refuse, before any weight is loaded, a model whose file llama.cpp would not compute as transformers does
    (an unsupported family, a rope scaling the family's writer does not reproduce, ...)."""
    family = gguf_family(config)
    if (problem := family.gguf_problem(config)) is not None:
        raise ExportError(problem)
    return family


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
    family = check_exportable(config)
    arch = family.gguf_architecture
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(_file_type(quant))
    for key, value in family.gguf_parameters(config):
        getattr(writer, f"add_{key}")(value)
    pre = add_vocabulary(writer, tokenizer, config.vocab_size)
    chat_template = gguf_chat_template(template, tokenizer)
    writer.add_chat_template(chat_template)
    count = _add_tensors(writer, model, family, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return WrittenGguf(Path(path), arch, quant, pre, chat_template, count)


def _file_type(quant: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]


# ---------------------------------------------------------------- tensors


def _gguf_tensors(model, family: Family):
    """(llama.cpp name, float32 tensor) for every weight the file needs, transformed as the family's converter does."""
    import gguf

    config = model.config
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == family.gguf_architecture)
    names = gguf.get_tensor_name_map(arch, family.layer_count(config))
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    for hf_name, tensor in model.state_dict().items():
        # A tied output head is the embedding matrix again: the converter writes it once (the checkpoint holds
        # it once), and llama.cpp falls back to token_embd when `output.weight` is missing.
        if output is not None and hf_name.endswith("lm_head.weight") and output.weight.data_ptr() == embedding.data_ptr():
            continue
        if hf_name.endswith((".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")):
            continue  # buffers the converter drops too
        transformed = family.gguf_tensor(hf_name, tensor.detach().to(torch.float32).cpu(), config)
        if transformed is None:
            continue
        name, data = transformed
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ExportError(f"GGUF export: no llama.cpp name for tensor '{hf_name}' of {type(model).__name__}")
        yield new_name, data
    yield from family.gguf_extra_tensors(config)


def _tensor_qtype(new_name: str, data: np.ndarray, quant: str):
    """The converter's choice in prepare_tensors: 1-D tensors and norms stay f32 (llama.cpp's kernels for them
    take f32 only), every other `.weight` gets the file's type."""
    import gguf

    if data.ndim <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]


def _add_tensors(writer, model, family: Family, quant: str) -> int:
    import gguf

    count = 0
    for new_name, data_torch in _gguf_tensors(model, family):
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

"""Model families: the facts lmtune needs about each kind of model, one module per family, one table.

A shared package below every stage (it imports none of them): training asks whether the layers are worth
compiling and how many there are, decoding whether the model takes position ids, export which llama.cpp
architecture, hyperparameters and tensor transforms to write. To add a family, write its module (a subclass of
`Family` or `RmsFamily`, after llama.cpp's converter class for it) and add its Hugging Face class names below.
A model of a family not in the table still trains and answers with the defaults of `Family`; only GGUF export
needs it to be listed.
"""

from __future__ import annotations

from .base import Family
from .bloom import BLOOM
from .gemma3 import GEMMA3
from .llama import LLAMA
from .qwen2 import QWEN2
from .qwen3 import QWEN3

# Hugging Face architecture (the class name in config.json's "architectures") -> its family.
FAMILIES: dict[str, Family] = {
    "BloomForCausalLM": BLOOM,
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": QWEN2,
    "Qwen3ForCausalLM": QWEN3,
    "Gemma3ForCausalLM": GEMMA3,
}

# A config built in memory has no "architectures" until it is saved; its model_type names the family then.
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES.values() for model_type in family.model_types}
_UNKNOWN = Family()


def family_of(config) -> Family | None:
    """The family of a transformers config, or None when it is not in the table."""
    for architecture in getattr(config, "architectures", None) or ():
        if architecture in FAMILIES:
            return FAMILIES[architecture]
    return _BY_MODEL_TYPE.get(getattr(config, "model_type", None))


def facts(config) -> Family:
    """The family of `config`, or the defaults every transformers causal LM meets when it is not in the table."""
    return family_of(config) or _UNKNOWN


def supported_gguf() -> str:
    """The families GGUF export writes, for the message that refuses the others."""
    return ", ".join(dict.fromkeys(f.name for f in FAMILIES.values() if f.gguf_architecture))


def layer_count(config) -> int | None:
    return facts(config).layer_count(config)


def takes_position_ids(config) -> bool:
    return facts(config).takes_position_ids


def packs(config) -> bool:
    return facts(config).packs

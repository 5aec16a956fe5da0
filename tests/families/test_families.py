"""The family table: every family answers for its Hugging Face names, the facts training and decoding ask, a model
not in the table keeps the defaults, and no pipeline stage names a family."""

from __future__ import annotations

import re
from pathlib import Path

import lmtune
from lmtune import families


def test_every_family_answers_for_its_architectures_and_model_types():
    from transformers import AutoConfig

    for architecture, family in families.FAMILIES.items():
        assert architecture in family.architectures
        for model_type in family.model_types:
            config = AutoConfig.for_model(model_type)
            assert families.family_of(config) is family  # found by model_type when architectures is unset
            config.architectures = [architecture]
            assert families.family_of(config) is family


def test_facts_training_and_decoding_ask():
    from transformers import BloomConfig, GPT2Config, Qwen3Config

    bloom, qwen3, gpt2 = BloomConfig(n_layer=3), Qwen3Config(num_hidden_layers=5), GPT2Config(n_layer=7)
    assert not families.takes_position_ids(bloom) and families.takes_position_ids(qwen3)
    assert (families.layer_count(bloom), families.layer_count(qwen3)) == (3, 5)
    assert not families.facts(bloom).compile_pays(bloom) and families.facts(qwen3).compile_pays(qwen3)
    # Not in the table: trains and answers with the defaults (GPT-2 counts its layers in n_layer, uses LayerNorm).
    assert families.family_of(gpt2) is None
    assert families.layer_count(gpt2) == 7 and families.takes_position_ids(gpt2)
    assert not families.facts(gpt2).compile_pays(gpt2)


def test_the_unsupported_message_names_every_exportable_family():
    text = families.supported_gguf()
    for name in ("BLOOM", "Llama", "Mistral", "Qwen2", "Qwen3", "Gemma 3"):
        assert name in text


def test_no_pipeline_stage_names_the_families_added_through_the_table():
    """A family arrives as one module in lmtune.families: training, inference and export never learn its name."""
    root = Path(lmtune.__file__).parent
    named = [f"{path.relative_to(root)}: {match.group(0)}"
             for stage in ("data", "training", "export", "inference", "evaluation")
             for path in (root / stage).rglob("*.py")
             for match in re.finditer(r"qwen3|gemma", path.read_text(encoding="utf-8"), re.IGNORECASE)]
    assert named == []

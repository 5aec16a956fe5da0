"""Qwen3 (lmtune.families.qwen3): trains, merges, answers, and exports to a GGUF that transformers' reader and llama.cpp
compute like the model: the per-head q/k RMSNorm written, no q/k/v biases, head_dim apart from hidden / heads."""

from __future__ import annotations

import pytest
import torch
from family_pipeline import export_verified, randomize_norms, save, train_merge_answer


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tmp_path_factory, llama_tokenizer) -> str:
    """head_dim 128 as in every Qwen3 (0.6B: 1024 / 16 heads = 64 apart from it); transformers' GGUF reader reads no
    key_length for qwen3 and takes Qwen3Config's default, 128, so a tiny model with another head_dim would not load
    back there."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(3)
    config = Qwen3Config(vocab_size=len(llama_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=512,
                         initializer_range=0.3, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = Qwen3ForCausalLM(config)
    randomize_norms(model)
    return save(tmp_path_factory.mktemp("models") / "tiny-qwen3", model, llama_tokenizer)


def test_qwen3_trains_merges_answers_and_exports_verified(tiny_qwen3_dir, tmp_path, capsys):
    import gguf

    merged = train_merge_answer(tiny_qwen3_dir, tmp_path)
    export_verified(capsys, merged, tmp_path / "qwen3.gguf")

    reader = gguf.GGUFReader(str(tmp_path / "qwen3.gguf"))
    assert reader.fields["general.architecture"].contents() == "qwen3"
    assert reader.fields["qwen3.attention.key_length"].contents() == 128
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight", "blk.1.attn_k_norm.weight"} <= names
    assert not any(name.endswith("attn_q.bias") for name in names)  # Qwen3 dropped Qwen2's q/k/v biases


def test_qwen3_q_norm_is_written_as_it_is(tiny_qwen3_dir, tmp_path, capsys):
    """llama.cpp's qwen3 graph multiplies by the stored q/k norm weight (no 1 + w as for Gemma), so the file holds the
    model's own weights."""
    import gguf
    from transformers import AutoModelForCausalLM

    export_verified(capsys, tiny_qwen3_dir, tmp_path / "q.gguf", quant="f16")
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir)
    stored = next(t for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors if t.name == "blk.1.attn_q_norm.weight")
    torch.testing.assert_close(torch.from_numpy(stored.data.copy()), model.model.layers[1].self_attn.q_norm.weight.detach())

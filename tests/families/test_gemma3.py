"""Gemma 3 text (lmtune.families.gemma3): trains, merges, answers, and exports to a GGUF that transformers' reader and
llama.cpp compute like the model: norm weights stored as 1 + w, the embedding left unscaled, the sliding-window
layers with their window, q/k norms; and what llama.cpp cannot run is refused before loading."""

from __future__ import annotations

import pytest
import torch
from family_pipeline import HAS_LLAMA_CPP, export_verified, randomize_norms, save, train_merge_answer

from lmtune.export.errors import ExportError
from lmtune.export.gguf import check_exportable
from lmtune.families import gemma3 as gemma3_family

WINDOW = 4  # shorter than every probe and prompt, so the sliding-window layers really slide


def gemma3_config(vocab_size: int, **overrides):
    """Six layers: five sliding-window ones and one global, the pattern llama.cpp runs; head_dim 256 (query_pre_attn
    _scalar 256) as in Gemma 3 270M and 1B, which transformers' GGUF reader assumes and llama.cpp's 1/sqrt(head_dim)
    attention scale matches."""
    from transformers import Gemma3TextConfig

    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                    sliding_window=WINDOW, max_position_embeddings=512, initializer_range=0.3,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Gemma3TextConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tmp_path_factory, llama_tokenizer) -> str:
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(4)
    model = Gemma3ForCausalLM(gemma3_config(len(llama_tokenizer)))
    randomize_norms(model)
    return save(tmp_path_factory.mktemp("models") / "tiny-gemma3", model, llama_tokenizer)


def test_gemma3_trains_merges_answers_and_exports_verified(tiny_gemma3_dir, tmp_path, capsys):
    import gguf

    merged = train_merge_answer(tiny_gemma3_dir, tmp_path)
    export_verified(capsys, merged, tmp_path / "gemma3.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "gemma3.gguf"))
    assert reader.fields["general.architecture"].contents() == "gemma3"
    assert reader.fields["gemma3.attention.sliding_window"].contents() == WINDOW
    assert reader.fields["gemma3.attention.key_length"].contents() == 256
    assert reader.fields["gemma3.rope.freq_base"].contents() == 1_000_000.0  # the global layers' theta


def test_norms_are_stored_as_one_plus_w_and_the_embedding_unscaled(tiny_gemma3_dir, tmp_path, capsys):
    import gguf
    from transformers import AutoModelForCausalLM

    export_verified(capsys, tiny_gemma3_dir, tmp_path / "g.gguf")
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, dtype=torch.float32)
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(str(tmp_path / "g.gguf")).tensors}
    layer = model.model.layers[0]
    for name, weight in [("blk.0.attn_norm.weight", layer.input_layernorm.weight),
                         ("blk.0.post_attention_norm.weight", layer.post_attention_layernorm.weight),
                         ("blk.0.ffn_norm.weight", layer.pre_feedforward_layernorm.weight),
                         ("blk.0.post_ffw_norm.weight", layer.post_feedforward_layernorm.weight),
                         ("blk.0.attn_q_norm.weight", layer.self_attn.q_norm.weight),
                         ("blk.0.attn_k_norm.weight", layer.self_attn.k_norm.weight),
                         ("output_norm.weight", model.model.norm.weight)]:
        torch.testing.assert_close(tensors[name], weight.detach() + 1, msg=name)
    torch.testing.assert_close(tensors["token_embd.weight"], model.model.embed_tokens.weight.detach())


def test_the_window_matters_on_the_probe(tiny_gemma3_dir):
    """The export's logit checks prove the sliding window only if the window changes the logits: the same weights
    without a window (every layer sees the whole prompt) answer differently on a prompt longer than it."""
    from transformers import AutoModelForCausalLM

    windowed = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, dtype=torch.float32).eval()
    unwindowed = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, dtype=torch.float32, sliding_window=512).eval()
    ids = torch.tensor([list(range(5, 25))])
    with torch.no_grad():
        assert not torch.allclose(windowed(ids).logits, unwindowed(ids).logits, atol=1e-3)


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'lmtune[gguf]')")
def test_without_the_norm_shift_the_export_refuses(tiny_gemma3_dir, tmp_path, capsys, monkeypatch):
    """The negative control: norm weights written as HF stores them (w, not 1 + w) load in llama.cpp and compute
    something else; the export's check sees it and writes nothing."""
    monkeypatch.setattr(gemma3_family.Gemma3, "gguf_tensor", lambda self, name, data, config: (name, data))
    from conftest import run

    code, _, err = run(capsys, "export", "--model", tiny_gemma3_dir, "--output", tmp_path / "m.gguf", "--quant", "f32")
    assert code == 2 and "does not reproduce the merged model" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides, words", [
    ({"query_pre_attn_scalar": 128}, "query_pre_attn_scalar"),
    ({"layer_types": ["full_attention"] * 6}, "layer_types"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 50000.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "sliding-window layers"),
])
def test_what_llama_cpp_would_compute_otherwise_is_refused(overrides, words):
    """llama.cpp fixes the attention scale, the layer pattern and the sliding layers' rope theta for gemma3 (no key
    carries them): a model that differs is refused in one line before any weight is loaded."""
    with pytest.raises(ExportError, match=words):
        check_exportable(gemma3_config(600, **overrides))

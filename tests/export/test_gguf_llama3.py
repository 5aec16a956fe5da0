"""GGUF export of Llama 3.1 / 3.2 / 3.3 models, whose rope_scaling is {"rope_type": "llama3", ...}.

llama.cpp has no "llama3" rope type: the file carries the per-frequency divisors as the `rope_freqs.weight` tensor
(gguf.llama3_rope_factors, mirroring the converter's LlamaModel.generate_extra_tensors). The tiny model here has
head_dim 16 (8 rotary frequencies, wavelengths 6.3, 19.9, 62.8, 199, ... tokens) and original_max_position_embeddings
64 with low/high frequency factors 1 and 4: the first frequency is kept, the next two are blended, the rest divided
by 8, so every branch of the scaling is used. The probe is longer than the low-frequency wavelength threshold
(64 tokens), so the scaled frequencies turn by whole radians over it.

The tokenizer is a byte-level BPE with Llama 3's own pre-tokenizer (its split regex, then ByteLevel without regex)
and Llama 3's BOS/EOS names, BOS added to every text as Llama 3's tokenizer does: the export must name it
"llama-bpe", and llama.cpp must tokenize the test sentences (digits in groups of three) as it does.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import _corpus

from lmtune.export import llamacpp
from lmtune.export.errors import ExportError
from lmtune.export.exporter import export_gguf
from lmtune.export.gguf import check_exportable
from lmtune.families import llama as llama_family
from lmtune.families.llama import llama3_rope_factors
from lmtune.export.verify import CONVERSATION, KL_TOLERANCE, ExportVerificationError

QUIET = {"log": lambda _: None}
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'lmtune[gguf]')")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
# Llama 3's tokenizer.json split regex (meta-llama/Llama-3.2-1B), digits in groups of up to three.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
PROBE_TEXT = ("Trí tuệ nhân tạo (AI) là gì? Học máy là một nhánh của AI giúp máy tính học từ dữ liệu. "
              "Mạng nơ-ron có 3 lớp, 128 nút; LoRA r=16. Học sâu dùng mạng nhiều lớp, 12345 tham số. ")


def make_llama3_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def llama3_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                    rope_scaling=dict(LLAMA3_ROPE), bos_token_id=0, eos_token_id=1, initializer_range=0.3)
    return LlamaConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def llama3_tokenizer():
    return make_llama3_tokenizer()


@pytest.fixture(scope="module")
def tiny_llama3_dir(tmp_path_factory, llama3_tokenizer) -> str:
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM(llama3_config(len(llama3_tokenizer)))
    assert model.config.rope_parameters["rope_type"] == "llama3"
    folder = tmp_path_factory.mktemp("models") / "tiny-llama3"
    model.save_pretrained(folder)
    llama3_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def long_probe(llama3_tokenizer) -> list[int]:
    ids = llama3_tokenizer(PROBE_TEXT * 4)["input_ids"][:160]
    assert len(ids) == 160 > LLAMA3_ROPE["original_max_position_embeddings"] / LLAMA3_ROPE["low_freq_factor"]
    return ids


def _kl(expected: torch.Tensor, actual: torch.Tensor) -> float:
    kl = torch.nn.functional.kl_div(actual.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="none")
    return float(kl.sum(-1).mean())


def _transformers_logits(folder: str, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    logits, _, _, _ = llamacpp.check(path, [ids], [], CONVERSATION)  # in a child process, as the export does
    return torch.from_numpy(logits)


def test_rope_factors_are_the_divisors_transformers_applies():
    """The converter's formula (mirrored) against transformers' own llama3 rope: unscaled / scaled frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = llama3_config(600)
    factors = llama3_rope_factors(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    unscaled = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    torch.testing.assert_close(factors, unscaled / scaled, rtol=1e-5, atol=0)
    # Every branch is used: kept (1), blended (strictly between), divided by the factor (8).
    assert factors[0] == 1 and 1 < factors[1] < factors[2] < 8 and torch.all(factors[3:] == 8)
    assert llama3_rope_factors(llama3_config(600, rope_scaling=None)) is None


def test_llama3_rope_is_refused_for_qwen2_and_other_scalings_still_are():
    """llama.cpp's converter writes rope_freqs in LlamaModel (Llama, Mistral) only; yarn is still not written."""
    from transformers import LlamaConfig, Qwen2Config

    check_exportable(llama3_config(600))
    with pytest.raises(ExportError, match="'llama3'.*qwen2"):
        check_exportable(Qwen2Config(vocab_size=600, hidden_size=64, num_attention_heads=4, rope_scaling=dict(LLAMA3_ROPE)))
    yarn = LlamaConfig(vocab_size=600, hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    with pytest.raises(ExportError, match="'yarn'.*llama3"):
        check_exportable(yarn)


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_llama3_export_matches_transformers_past_the_scaled_wavelengths(tiny_llama3_dir, long_probe, quant, tmp_path):
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path / "m.gguf"
    result = export_gguf(str(path), model=tiny_llama3_dir, quant=quant, **QUIET)
    assert result.architecture == "llama" and result.pre_tokenizer == "llama-bpe"
    readers = {check.reader for check in result.checks}
    assert readers == ({"transformers", "llama.cpp"} if HAS_LLAMA_CPP else {"transformers"})

    # What the converter writes: the factors as an f32 tensor of head_dim / 2 values, no rope.scaling keys.
    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
    factors = llama3_rope_factors(AutoConfig.from_pretrained(tiny_llama3_dir))
    torch.testing.assert_close(torch.from_numpy(tensor.data.copy()), factors)
    assert not [key for key in reader.fields if "rope.scaling" in key]
    assert reader.fields["llama.context_length"].contents() == 256

    # transformers' GGUF reader brings the file back with unscaled rope (it drops rope_freqs and reads no llama3
    # scaling): why the export's transformers check applies the file's rope_freqs itself (verify.py). If this
    # fails, a newer transformers reads them, and that workaround is no longer needed.
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    assert back.config.rope_parameters["rope_type"] == "default"

    if HAS_LLAMA_CPP:
        expected = _transformers_logits(tiny_llama3_dir, long_probe)
        actual = _llama_cpp_logits(path, long_probe)
        assert _kl(expected, actual) < KL_TOLERANCE[quant]
        # The positions past the low-frequency threshold agree too (not only the short prefix).
        assert _kl(expected[64:], actual[64:]) < KL_TOLERANCE[quant]


@needs_llama_cpp
def test_without_rope_freqs_llama_cpp_disagrees_and_the_export_refuses(tiny_llama3_dir, llama3_tokenizer, long_probe,
                                                                       tmp_path, monkeypatch):
    """The negative control: the same file without rope_freqs is loaded by llama.cpp (it is optional there) and runs
    unscaled rope; its logits on the long probe are far from transformers', and the export refuses to write it."""
    from transformers import AutoModelForCausalLM

    from lmtune.data.template import PromptTemplate
    from lmtune.export.gguf import write_gguf

    monkeypatch.setattr(llama_family, "llama3_rope_factors", lambda config: None)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama3_dir, dtype=torch.float32).eval()
    path = tmp_path / "no-rope-freqs.gguf"
    write_gguf(model, llama3_tokenizer, PromptTemplate.for_tokenizer(llama3_tokenizer), path, "f16", "control")
    kl = _kl(_transformers_logits(tiny_llama3_dir, long_probe), _llama_cpp_logits(path, long_probe))
    assert kl > 20 * KL_TOLERANCE["q8_0"], kl  # measured 3.8: 76x the q8_0 tolerance, 1900x f16's

    with pytest.raises(ExportVerificationError, match="no rope_freqs tensor"):
        export_gguf(str(tmp_path / "refused.gguf"), model=tiny_llama3_dir, quant="f16", **QUIET)
    assert not (tmp_path / "refused.gguf").exists()

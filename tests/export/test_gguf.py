"""GGUF export: every supported architecture loads back with the same logits and tokenizer, the file carries
the training prompt as its chat template, and bad input gets one clear line with nothing left behind.

When llama-cpp-python is installed, every export here is also checked by the real llama.cpp (logits,
tokenization, chat template): `test_llama_cpp_checked_every_export` makes sure that really happened.
"""

from __future__ import annotations

import errno
import importlib.util
import shutil

import pytest
import torch
import yaml
from conftest import make_llama_tokenizer, run

from lmtune.data.template import PromptTemplate
from lmtune.export import llamacpp
from lmtune.export.chat_templates import gguf_chat_template
from lmtune.export.exporter import export_gguf
from lmtune.families import llama as llama_family
from lmtune.families.llama import llama_permute
from lmtune.export.verify import KL_TOLERANCE, check_chat_template, runtime_ids

QUIET = {"log": lambda _: None}
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
SENTENCES = ["Trí tuệ nhân tạo (AI) là gì?", "Học máy là một nhánh của AI giúp máy tính học từ dữ liệu.",
             "Mạng nơ-ron có 3 lớp, 128 nút; LoRA r=16.", "Human: Học sâu là gì?\nAssistant: Học sâu dùng mạng nhiều lớp."]


def _save(folder, model, tokenizer) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory, llama_tokenizer) -> str:
    """Qwen2: q/k/v projections with biases (made non-zero, so a dropped bias changes the logits), and more embedding
    rows than tokens, as the real Qwen2 models have (transformers gives the tokenizer Qwen2's split regex and a
    <|endoftext|> pad token, id 600)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)
    return _save(tmp_path_factory.mktemp("models") / "tiny-qwen2", model, llama_tokenizer)


@pytest.fixture(scope="module")
def tiny_mistral_dir(tmp_path_factory, llama_tokenizer) -> str:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(2)
    config = MistralConfig(vocab_size=len(llama_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           initializer_range=0.3, bos_token_id=1, eos_token_id=2, sliding_window=None)
    return _save(tmp_path_factory.mktemp("models") / "tiny-mistral", MistralForCausalLM(config), llama_tokenizer)


FIXTURES = {"bloom": "tiny_bloom_dir", "llama": "tiny_llama_dir", "qwen2": "tiny_qwen2_dir", "mistral": "tiny_mistral_dir"}
EXPECTED_ARCH = {"bloom": "bloom", "llama": "llama", "qwen2": "qwen2", "mistral": "llama"}
EXPECTED_PRE = {"bloom": "gpt-2", "llama": "gpt-2", "qwen2": "qwen2", "mistral": "gpt-2"}


def _kl(expected: torch.Tensor, actual: torch.Tensor) -> float:
    kl = torch.nn.functional.kl_div(actual.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="none")
    return float(kl.sum(-1).mean())


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
@pytest.mark.parametrize("arch", ["bloom", "llama", "qwen2", "mistral"])
def test_export_loads_back_with_the_same_logits_and_tokenizer(request, arch, quant, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = request.getfixturevalue(FIXTURES[arch])
    result = export_gguf(str(tmp_path / "model.gguf"), model=folder, quant=quant, **QUIET)
    assert result.architecture == EXPECTED_ARCH[arch] and result.pre_tokenizer == EXPECTED_PRE[arch]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary files left

    # An independent reload, on sentences the export's own check did not use.
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    for sentence in SENTENCES:
        assert reloaded(sentence)["input_ids"] == tokenizer(sentence)["input_ids"], sentence
    ids = torch.tensor([tokenizer(SENTENCES[1])["input_ids"]])
    with torch.no_grad():
        expected, actual = original(ids).logits[0], back(ids).logits[0]
    if quant == "f32":
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    else:
        assert _kl(expected, actual) < KL_TOLERANCE[quant]
        assert not torch.equal(actual, expected)  # really quantized

    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.1.ffn_down.weight" in names
    if arch == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    chat_template = reader.fields["tokenizer.chat_template"].contents()
    assert chat_template == result_chat_template(folder)


def result_chat_template(folder: str) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return gguf_chat_template(PromptTemplate.for_tokenizer(tokenizer), tokenizer)


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'lmtune[gguf]')")
@pytest.mark.parametrize("arch", ["bloom", "llama", "qwen2"])
def test_llama_cpp_checked_every_export(request, arch, tmp_path):
    """With the bindings installed, the real llama.cpp loaded the file, and its logits, tokenization and chat
    template agreed (the export raises otherwise)."""
    folder = request.getfixturevalue(FIXTURES[arch])
    result = export_gguf(str(tmp_path / "m.gguf"), model=folder, quant="f16", **QUIET)
    readers = {check.reader: check for check in result.checks}
    assert set(readers) == {"transformers", "llama.cpp"}
    assert readers["llama.cpp"].mean_kl < KL_TOLERANCE["f16"] and readers["llama.cpp"].top1_agreement > 0.9


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'lmtune[gguf]')")
def test_k_quant_through_llama_cpps_quantizer(tiny_qwen2_dir, tmp_path):
    import gguf

    result = export_gguf(str(tmp_path / "m.gguf"), model=tiny_qwen2_dir, quant="q6_k", **QUIET)
    file_type = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.file_type"].contents()
    assert file_type == gguf.LlamaFileType.MOSTLY_Q6_K
    assert {c.reader for c in result.checks} == {"transformers", "llama.cpp"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # the f32 intermediate is gone


def test_llama_permute_turns_rotate_half_into_adjacent_pairs():
    """Why the Q/K permutation exists: rotating a permuted head pairwise (llama.cpp) equals rotating the original
    head by halves (Hugging Face's rotate_half) and permuting the result."""
    torch.manual_seed(0)
    head_dim, heads, angle = 8, 2, torch.rand(4)
    q = torch.randn(heads * head_dim, 1)[:, 0]

    def rotate_halves(head):  # Hugging Face: pair (i, i + d/2)
        a, b = head[: head_dim // 2], head[head_dim // 2:]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()])

    def rotate_pairs(head):  # llama.cpp LLAMA rope: pair (2i, 2i + 1)
        a, b = head[0::2], head[1::2]
        return torch.stack([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], 1).reshape(-1)

    hf = torch.cat([rotate_halves(h) for h in q.reshape(heads, head_dim)])
    cpp = torch.cat([rotate_pairs(h) for h in llama_permute(q[:, None], heads, heads)[:, 0].reshape(heads, head_dim)])
    torch.testing.assert_close(cpp, llama_permute(hf[:, None], heads, heads)[:, 0])


def _bos_tokenizer():
    """A tokenizer that adds BOS to every text, as Llama 2's does: the plain template then starts every turn with it."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = make_llama_tokenizer(pad_is_eos=False)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tokenizer("Học máy")["input_ids"][0] == 1
    return tokenizer


@pytest.mark.parametrize("system_prompt", ["", "Bạn là trợ lý AI, trả lời ngắn gọn."])
@pytest.mark.parametrize("tokenizer_kind", ["bloom", "adds_bos"])
def test_plain_chat_template_renders_exactly_the_training_prompt(bloom_tokenizer, system_prompt, tokenizer_kind):
    tokenizer = bloom_tokenizer if tokenizer_kind == "bloom" else _bos_tokenizer()
    add_bos = tokenizer_kind == "adds_bos"
    template = PromptTemplate(kind="plain", system_prompt=system_prompt)
    jinja = gguf_chat_template(template, tokenizer)
    assert check_chat_template(jinja, tokenizer, template, add_bos) is None

    def rendered_ids(messages):
        text = tokenizer.apply_chat_template(messages, chat_template=jinja, add_generation_prompt=True, tokenize=False)
        return runtime_ids(tokenizer, text, add_bos)

    question = "Trí tuệ nhân tạo là gì?"
    assert rendered_ids([{"role": "user", "content": question}]) == template.prompt_ids(tokenizer, question)
    three_turns = [{"role": "user", "content": "Học máy là gì?"}, {"role": "assistant", "content": "Một nhánh của AI."},
                   {"role": "user", "content": "Còn học sâu?"}, {"role": "assistant", "content": "Mạng nhiều lớp."},
                   {"role": "user", "content": "LoRA?"}]
    assert rendered_ids(three_turns) == template.conversation_ids(tokenizer, three_turns)
    with_system = [{"role": "system", "content": "Trả lời bằng tiếng Việt."}] + three_turns
    assert rendered_ids(with_system) == template.conversation_ids(tokenizer, with_system)


def test_chat_template_model_keeps_its_template_with_the_training_system_prompt(llama_tokenizer):
    tokenizer = make_llama_tokenizer(pad_is_eos=False)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    template = PromptTemplate.for_tokenizer(tokenizer, system_prompt="Bạn là trợ lý.")
    jinja = gguf_chat_template(template, tokenizer)
    assert tokenizer.chat_template in jinja
    assert check_chat_template(jinja, tokenizer, template, add_bos=False) is None


def test_adapter_is_merged_in_memory_and_exported(trained_bloom, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmtune.export.merge import merge

    result, _, root, _ = trained_bloom
    merged_dir = tmp_path / "merged"
    merge(result.output_dir, str(merged_dir), **QUIET)
    export_gguf(str(tmp_path / "tuned.gguf"), adapter=result.output_dir, quant="f32", **QUIET)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tuned.gguf", dtype=torch.float32)
    ids = torch.tensor([[5, 80, 120, 7, 300, 42]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, merged(ids).logits, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


def _one_error_line(err: str) -> str:
    # (progress bars of model loading may precede it: they are not messages)
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_adapter_whose_base_is_gone_is_refused(trained_bloom, tmp_path, capsys):
    result, _, _, _ = trained_bloom
    adapter = tmp_path / "adapter"
    shutil.copytree(result.output_dir, adapter)
    config_file = adapter / "lmtune_config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    config["model"]["name_or_path"] = str(tmp_path / "moved-away-base")
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    code, _, err = run(capsys, "export", "--adapter", adapter, "--output", tmp_path / "m.gguf")
    assert code == 2 and "moved-away-base" in _one_error_line(err)
    assert not (tmp_path / "m.gguf").exists()


def test_unsupported_architecture_is_refused_before_loading_weights(tmp_path, capsys, bloom_tokenizer, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    import lmtune.export.exporter as exporter

    folder = _save(tmp_path / "gpt2", GPT2LMHeadModel(GPT2Config(vocab_size=len(bloom_tokenizer), n_embd=32, n_layer=1,
                                                                   n_head=2)), bloom_tokenizer)
    monkeypatch.setattr(exporter, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    code, _, err = run(capsys, "export", "--model", folder, "--output", tmp_path / "m.gguf")
    line = _one_error_line(err)
    assert code == 2 and "'gpt2'" in line and "BLOOM" in line and "Qwen2" in line
    assert not (tmp_path / "m.gguf").exists()


def test_existing_output_is_refused_without_overwrite_and_replaced_with_it(tiny_llama_dir, tmp_path, capsys):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous file")
    code, _, err = run(capsys, "export", "--model", tiny_llama_dir, "--output", target, "--quant", "f16")
    assert code == 2 and "already exists" in _one_error_line(err) and "--overwrite" in err
    assert target.read_bytes() == b"previous file"
    code, out, err = run(capsys, "export", "--model", tiny_llama_dir, "--output", target, "--quant", "f16", "--overwrite")
    assert code == 0, err
    assert target.read_bytes()[:4] == b"GGUF"


def test_disk_full_while_writing_keeps_the_previous_file(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import gguf

    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous file")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    code, _, err = run(capsys, "export", "--model", tiny_llama_dir, "--output", target, "--overwrite")
    line = _one_error_line(err)
    assert code == 2 and "no space left" in line and "untouched" in line
    assert target.read_bytes() == b"previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_a_file_that_does_not_reproduce_the_model_is_not_written(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    # Without the Q/K permutation the file holds the right numbers in the wrong layout: only the check can tell.
    monkeypatch.setattr(llama_family, "llama_permute", lambda weights, n_head, n_head_kv: weights)
    code, _, err = run(capsys, "export", "--model", tiny_llama_dir, "--output", tmp_path / "m.gguf", "--quant", "f32")
    line = _one_error_line(err)
    assert code == 2 and "does not reproduce the merged model" in line and "nothing was written" in line
    assert list(tmp_path.iterdir()) == []


def test_k_quants_without_llama_cpp_say_how_to_get_it(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    code, _, err = run(capsys, "export", "--model", tiny_llama_dir, "--output", tmp_path / "m.gguf", "--quant", "q4_k_m")
    line = _one_error_line(err)
    assert code == 2 and "pip install 'lmtune[gguf]'" in line and "q8_0" in line
    assert list(tmp_path.iterdir()) == []


def test_output_must_be_a_gguf_file_name(tiny_llama_dir, tmp_path, capsys):
    code, _, err = run(capsys, "export", "--model", tiny_llama_dir, "--output", tmp_path / "model.bin")
    assert code == 2 and ".gguf" in _one_error_line(err)


def test_export_prints_its_own_lines_only(tiny_llama_dir, tmp_path):
    """No library progress bar and no library warning (with its file path) among export's lines, in a real process."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lmtune", "export", "--model", tiny_llama_dir, "--output",
                           str(tmp_path / "m.gguf"), "--quant", "f32"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    text = done.stdout + done.stderr
    assert "export: wrote" in text
    for noise in ("Warning", "it/s]", "site-packages"):
        assert noise not in text, text

"""GGUF export of a SentencePiece vocabulary (Llama 2, Mistral v0.1-v0.3, TinyLlama): the tokenizer becomes
llama.cpp's "llama" tokenizer (tokens, scores, types), and the real llama.cpp splits Vietnamese and English
text into exactly the ids the Hugging Face tokenizer gives, and computes the same logits.

The vocabulary is a real SentencePiece BPE model, trained here on the bundled Vietnamese data with Llama 2's
trainer settings (byte fallback, digits split, no normalization), in two folders: one with tokenizer.json only
(what transformers 5 saves, so every folder lmtune merges), one that also has the SentencePiece model file
tokenizer.model (what Llama 2 and Mistral checkpoints ship, read the way llama.cpp's converter reads it).
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil

import pytest
import torch
from conftest import TRAIN_DATA, run

from lmtune.export import llamacpp
from lmtune.export.exporter import export_gguf
from lmtune.export.verify import KL_TOLERANCE, llama_cpp_sentencepiece_ids

pytest.importorskip("sentencepiece", reason="the sentencepiece package trains the test vocabulary (pip install 'lmtune[test]')")

QUIET = {"log": lambda _: None}
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'lmtune[gguf]')")
STRINGS = [
    "Trí tuệ nhân tạo (AI) là gì?",
    "Học máy là một nhánh của AI giúp máy tính học từ dữ liệu.",
    "Mạng nơ-ron có 3 lớp, 128 nút; LoRA r=16, alpha 32.",
    "Human: Học sâu là gì?\nAssistant: Học sâu dùng mạng nhiều lớp.",
    "What is LoRA? It's low-rank adaptation of a frozen model.",
    "Fine-tuning  with   spaces,\ttabs\nand new lines\n\n2024-05-17",
    "Emoji 🚀 and rare letters ǅ Ωμέγα ₫ fall back to bytes.",
    "NGHIÊN CỨU Ở VIỆT NAM, nghiên cứu ở Việt Nam",
]


def _train_sentencepiece() -> bytes:
    import sentencepiece as spm

    rows = [json.loads(line) for line in TRAIN_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = [r["question"] for r in rows] + [r["answer"] for r in rows] + [
        "What is machine learning? It's a branch of AI.", "Human: Assistant:", "LoRA adds low-rank matrices."]
    model = io.BytesIO()
    # Llama 2's trainer settings: BPE, byte fallback for characters outside the vocabulary, digits one by one, no
    # normalization and whitespace kept as it is; ids 0/1/2 = <unk> <s> </s>, no pad.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=700,
                                   byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                                   character_coverage=0.999, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    return model.getvalue()


@pytest.fixture(scope="module")
def sentencepiece_llama(tmp_path_factory) -> dict[str, str]:
    """{"json": folder with tokenizer.json only, "model_file": the same plus tokenizer.model, "spm": the trained
    SentencePiece model's folder}: a tiny random Llama
    (three more embedding rows than tokens, as padded vocabularies have) with a LlamaTokenizer built from a
    trained SentencePiece model."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    root = tmp_path_factory.mktemp("sentencepiece")
    (root / "spm").mkdir()
    (root / "spm" / "tokenizer.model").write_bytes(_train_sentencepiece())
    tokenizer = LlamaTokenizer.from_pretrained(root / "spm", add_bos_token=True)  # converted from tokenizer.model
    assert tokenizer("Xin chào")["input_ids"][0] == tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tokenizer) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    folders = {"json": root / "json", "model_file": root / "model_file"}
    for folder in folders.values():
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    assert not (folders["json"] / "tokenizer.model").exists()
    shutil.copy(root / "spm" / "tokenizer.model", folders["model_file"] / "tokenizer.model")
    return {**{kind: str(folder) for kind, folder in folders.items()}, "spm": str(root / "spm")}


def _kl(expected: torch.Tensor, actual: torch.Tensor) -> float:
    kl = torch.nn.functional.kl_div(actual.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="none")
    return float(kl.sum(-1).mean())


def _fields(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    names = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
             "tokenizer.ggml.token_type", "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_bos_token"]
    return {name.rpartition(".")[2]: reader.fields[name].contents() for name in names}


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["json", "model_file"])
def test_llama_cpp_tokenizes_and_computes_like_the_hf_model(sentencepiece_llama, kind, tmp_path):
    import gguf
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = sentencepiece_llama[kind]
    result = export_gguf(str(tmp_path / "m.gguf"), model=folder, quant="f16", **QUIET)
    assert {c.reader for c in result.checks} == {"transformers", "llama.cpp"} and result.pre_tokenizer == "default"

    tokenizer = AutoTokenizer.from_pretrained(folder)
    fields = _fields(tmp_path / "m.gguf")
    assert (fields["model"], fields["pre"], fields["add_space_prefix"], fields["add_bos_token"]) == ("llama", "default", True, True)
    types = fields["token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<0x0A>")] == gguf.TokenType.BYTE
    assert types[1] == types[2] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert fields["tokens"][-3:] == [f"[PAD{i}]" for i in range(len(tokenizer), len(tokenizer) + 3)]
    processor = spm.SentencePieceProcessor(model_file=f"{sentencepiece_llama['spm']}/tokenizer.model")
    trained_scores = [processor.GetScore(i) for i in range(3, processor.vocab_size())]
    if kind == "model_file":  # the converter's way: pieces and scores straight from tokenizer.model
        assert fields["scores"][3:processor.vocab_size()] == trained_scores
    else:  # rebuilt from the merges: other numbers, the same order of preference
        assert fields["scores"][3:processor.vocab_size()] != trained_scores

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = llamacpp.load(tmp_path / "m.gguf", n_ctx=256)
    try:
        for text in STRINGS:
            expected = tokenizer(text)["input_ids"]  # with BOS, as training tokenizes a prompt
            assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == expected, text
        # Every answer of the bundled data (434): with llama.cpp's converter fallback for a folder without
        # tokenizer.model (every score -1000), 264 of them came out differently; with the scores written here, none.
        answers = [json.loads(line)["answer"] for line in TRAIN_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
        differ = [a for a in answers if llm.tokenize(a.encode("utf-8"), add_bos=True, special=False) != tokenizer(a)["input_ids"]]
        assert differ == []
        # Special tokens inside the text, and a text that starts with a space: where llama.cpp and transformers 5
        # differ (llama.cpp puts a space before text after an added token), the export's own check simulates llama.cpp.
        for text in ["Human: Học máy?\nAssistant: Một nhánh của AI.</s><s>Human: Còn học sâu?\nAssistant:",
                     " Học máy", "<s>Xin chào</s>"]:
            assert llamacpp.tokenize(llm, text) == llama_cpp_sentencepiece_ids(tokenizer, text, True), text
        ids = tokenizer(" ".join(STRINGS[:5]))["input_ids"]
        with torch.no_grad():
            expected_logits = model(torch.tensor([ids])).logits[0]
        actual_logits = torch.from_numpy(llamacpp.logits(llm, ids))
        assert _kl(expected_logits, actual_logits) < KL_TOLERANCE["f16"]
        assert (expected_logits.argmax(-1) == actual_logits.argmax(-1)).float().mean() > 0.95
    finally:
        llm.close()


@pytest.mark.parametrize("kind", ["json", "model_file"])
def test_transformers_gguf_reader_loads_it_back(sentencepiece_llama, kind, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = sentencepiece_llama[kind]
    export_gguf(str(tmp_path / "m.gguf"), model=folder, quant="f32", use_llama_cpp=False, **QUIET)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in STRINGS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(STRINGS[1])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, original(ids).logits, atol=1e-4, rtol=0)


@needs_llama_cpp
def test_k_quant_of_a_sentencepiece_model(sentencepiece_llama, tmp_path):
    result = export_gguf(str(tmp_path / "m.gguf"), model=sentencepiece_llama["json"], quant="q6_k", **QUIET)
    assert {c.reader for c in result.checks} == {"transformers", "llama.cpp"}


def test_unigram_sentencepiece_is_refused_in_one_line(tmp_path, capsys):
    """A Unigram vocabulary (T5-style SentencePiece): llama.cpp's "llama" tokenizer would split text differently."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(c, -float(i)) for i, c in enumerate("▁abcdefghijklmnopqrstuvwxyz")]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(pieces), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "unigram")
    tokenizer.save_pretrained(tmp_path / "unigram")
    code, _, err = run(capsys, "export", "--model", tmp_path / "unigram", "--output", tmp_path / "out" / "m.gguf")
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert code == 2 and len(lines) == 1 and "Unigram" in lines[0] and "Llama 2" in lines[0], err
    assert not (tmp_path / "out" / "m.gguf").exists()


def test_chat_template_with_text_after_special_tokens_is_refused_with_the_reason(sentencepiece_llama, tmp_path, capsys):
    """A Zephyr-style template (`</s>` then text, as TinyLlama-Chat's) on a transformers 5 SentencePiece tokenizer: lmtune
    trained on ids without a "▁" after each `</s>`, llama.cpp would send one. The export refuses and says why."""
    from transformers import AutoTokenizer

    folder = tmp_path / "chat"
    shutil.copytree(sentencepiece_llama["json"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token }}"
                               "{% endfor %}"
                               "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    tokenizer.save_pretrained(folder)
    code, _, err = run(capsys, "export", "--model", folder, "--output", tmp_path / "out" / "m.gguf", "--quant", "f16")
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert code == 2 and len(lines) == 1 and "put a space before text that follows a special token" in lines[0], err
    assert not (tmp_path / "out" / "m.gguf").exists()

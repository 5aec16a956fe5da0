"""Tiny random models built on the fly, so unit tests need no network and run in seconds.

* tiny BLOOM: BLOOM's architecture and special-token ids (<unk>=0 <s>=1 </s>=2 <pad>=3), no BOS added;
* tiny Llama: a tokenizer with no pad token at all (padding must be masked by position);
* tiny "pad is eos" Llama: like SmolLM2, whose pad id equals its EOS id.
The tokenizers are byte-level BPEs trained on the bundled Vietnamese data. The models use a large
initializer range (0.3 instead of 0.02) so that their logits are not near-uniform and a few
LoRA steps visibly move the loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
TRAIN_DATA = REPO / "data" / "vi_ai_qa.jsonl"
SHARED_DATA = REPO.parent / "shared" / "data"


def _corpus() -> list[str]:
    rows = [json.loads(line) for line in TRAIN_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["question"] for r in rows] + [r["answer"] for r in rows] + ["Human: Assistant:", "What is LoRA?"]


def _train_tokenizer(specials: list[str], vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def make_bloom_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = _train_tokenizer(["<unk>", "<s>", "</s>", "<pad>"])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert (t.unk_token_id, t.bos_token_id, t.eos_token_id, t.pad_token_id) == (0, 1, 2, 3)
    return t


def make_llama_tokenizer(pad_is_eos: bool):
    from transformers import PreTrainedTokenizerFast

    tok = _train_tokenizer(["<unk>", "<s>", "</s>"])
    extra = {"pad_token": "</s>"} if pad_is_eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **extra)


def make_tiny_bloom(tokenizer):
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=2, n_head=4,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=0.3)
    return BloomForCausalLM(config)


def make_tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=tokenizer.pad_token_id, initializer_range=0.3)
    return LlamaForCausalLM(config)


def _save(tmp_root: Path, name: str, model, tokenizer) -> str:
    folder = tmp_root / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def bloom_tokenizer():
    return make_bloom_tokenizer()


@pytest.fixture(scope="session")
def llama_tokenizer():
    return make_llama_tokenizer(pad_is_eos=False)


@pytest.fixture(scope="session")
def tiny_bloom_dir(tmp_path_factory, bloom_tokenizer) -> str:
    return _save(tmp_path_factory.mktemp("models"), "tiny-bloom", make_tiny_bloom(bloom_tokenizer), bloom_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, llama_tokenizer) -> str:
    return _save(tmp_path_factory.mktemp("models"), "tiny-llama", make_tiny_llama(llama_tokenizer), llama_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_pad_eos_dir(tmp_path_factory) -> str:
    tok = make_llama_tokenizer(pad_is_eos=True)
    return _save(tmp_path_factory.mktemp("models"), "tiny-llama-pad-eos", make_tiny_llama(tok), tok)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


QA = [
    {"question": "Trí tuệ nhân tạo (AI) là gì?", "answer": "AI là khả năng mô phỏng trí thông minh con người của máy móc."},
    {"question": "Học máy là gì?", "answer": "Học máy là một nhánh của AI giúp máy tính học từ dữ liệu."},
    {"question": "LoRA là gì?", "answer": "LoRA là kỹ thuật tinh chỉnh chỉ huấn luyện các ma trận hạng thấp."},
    {"question": "Overfitting là gì?", "answer": "Overfitting là khi mô hình học thuộc dữ liệu huấn luyện."},
]


@pytest.fixture
def qa_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "qa.jsonl", QA)


def train_config(model_dir, data, out, **overrides):
    """A tiny, fast training config for the tiny random models."""
    from lmtune.config import build_config

    base = {"model.name_or_path": model_dir, "data.paths": [data], "train.output_dir": str(out),
            "train.epochs": 10, "train.batch_size": 2, "train.grad_accum": 1, "train.learning_rate": 1e-2,
            "train.warmup_steps": 0, "lora.dropout": 0.0}
    return build_config(overrides={**base, **overrides})


@pytest.fixture(scope="session")
def trained_bloom(tiny_bloom_dir, tmp_path_factory):
    """One real training run on the tiny BLOOM, with a snapshot of every parameter right after LoRA was added."""
    import importlib

    from lmtune.training.train import train

    # the package re-exports train(), which hides the module attribute
    train_module = importlib.import_module("lmtune.training.methods.lora")  # where LoRA is added
    root = tmp_path_factory.mktemp("run")
    data = write_jsonl(root / "qa.jsonl", QA)
    snapshot = {}
    real_add_lora = train_module.add_lora

    def recording_add_lora(*args, **kwargs):
        model = real_add_lora(*args, **kwargs)
        snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return model

    train_module.add_lora = recording_add_lora
    try:
        result = train(train_config(tiny_bloom_dir, data, root / "adapter"), log=lambda _: None)
    finally:
        train_module.add_lora = real_add_lora
    return result, snapshot, root, data


def lora_llama(model_dir: str, dtype: torch.dtype = torch.float32):
    """The tiny Llama with LoRA r=4 on every linear layer, in training mode, seeded. peft starts B at zero, so the A
    gradients would be zero too; a random B makes every gradient count."""
    from lmtune.model import add_lora, load_model, resolve_source

    torch.manual_seed(0)
    model = add_lora(load_model(resolve_source(model_dir), dtype=dtype), 4, 8, 0.0, "none", "all-linear")
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    return model.train()


def conversation(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def run(capsys, *args):
    """Run the CLI in this process; (exit code, stdout, stderr)."""
    from lmtune.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def inspect_rows(tmp_path, rows, **kwargs):
    from lmtune.data.inspect import inspect_data

    return inspect_data([write_jsonl(tmp_path / "d.jsonl", rows)], **kwargs)


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# A minimal chat template (role line, content, end-of-turn) for tiny tokenizers that have none.
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def chat_tokenizer(llama_tokenizer):
    import copy

    tokenizer = copy.deepcopy(llama_tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(autouse=True, scope="session")
def _private_cpu_registry(tmp_path_factory):
    """The test process registers as a CPU user in a registry of its own: the lmtune processes the tests start
    must not see it and halve their threads (runs compared for equal weights must compute alike)."""
    from lmtune import processes

    real = processes._registry
    folder = tmp_path_factory.mktemp("cpu-registry")
    processes._registry = lambda: folder
    yield
    processes._registry = real

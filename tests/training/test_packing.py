"""Packed rows (data/packing.py): every sample in one row, the label contract per packed sample, and the loss of a
packed row equal to the loss of its samples unpacked, on every family that packs (their attention must keep each
sample to itself, Gemma 3's sliding window included); BLOOM does not pack."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import QA, conversation, make_tiny_llama, train_config, write_jsonl

from lmtune.data.collate import Collator
from lmtune.data.packing import PACKED_TOKENS, PackedCollator, check_pack, pack, pack_length
from lmtune.data.readers import Example
from lmtune.data.template import PromptTemplate
from lmtune.data.tokenize import IGNORE_INDEX, tokenize_examples
from lmtune.errors import LabelContractError, LmtuneError
from lmtune.training.loss import answer_only_loss


def _samples(tokenizer, extra: int = 0) -> list[dict]:
    template = PromptTemplate.for_tokenizer(tokenizer, "plain")
    examples = [Example(r["question"], r["answer"]) for r in QA]
    examples += [Example("", "", messages=conversation("Học máy là gì?", "Một nhánh của AI.", "Còn LoRA?",
                                                       "Tinh chỉnh hạng thấp."))]
    examples += [Example(f"Câu hỏi số {i}?", "Trả lời " * (1 + i % 7)) for i in range(extra)]
    return tokenize_examples(examples, tokenizer, template, 128)[0]


def test_best_fit_places_every_sample_once_within_the_length(llama_tokenizer):
    samples = _samples(llama_tokenizer, extra=40)
    rows, report = pack(samples, 128, seed=1)
    assert all(len(r["input_ids"]) <= 128 for r in rows)
    placed = sorted(tuple(r["input_ids"][s["start"]: s["start"] + s["length"]]) for r in rows for s in r["segments"])
    assert placed == sorted(tuple(s["input_ids"]) for s in samples)
    assert report.tokens == sum(len(s["input_ids"]) for s in samples)
    assert report.rows == len(rows) <= -(-report.tokens // 128) + 1  # at most one row more than the tokens need
    assert "padding" in report.describe()


def test_the_row_length_follows_the_batch_and_never_cuts_a_sample():
    assert pack_length([100] * 10, 4) == 512  # 4 samples of 100 tokens -> 400 -> the next length, 512
    assert pack_length([100, 700], 1) == 768  # never shorter than the longest sample
    assert pack_length([100, 700], 1, requested=900) == 900
    with pytest.raises(ValueError, match="data.pack_length 500 is shorter than the longest sample .700 tokens"):
        pack_length([100, 700], 1, requested=500)


def test_the_contract_is_checked_per_packed_sample(llama_tokenizer):
    samples = _samples(llama_tokenizer)
    rows, _ = pack(samples, 256)
    collate = PackedCollator(llama_tokenizer, 256)
    batch = collate(rows)
    assert "attention_mask" not in batch and batch[PACKED_TOKENS].tolist() == [len(r["input_ids"]) for r in rows]
    # Every sample's first label is ignored: it would be predicted from the previous sample.
    for row, r in zip(batch["labels"], rows):
        assert all(int(row[s["start"]]) == IGNORE_INDEX for s in r["segments"])
    second = rows[0]["segments"][1]
    broken = {k: v.clone() for k, v in batch.items()}
    broken["labels"][0, second["start"]] = broken["input_ids"][0, second["start"]]
    with pytest.raises(LabelContractError, match="packed row 0, sample 1: its first token is a training target"):
        check_pack(broken, 0, rows[0]["segments"], llama_tokenizer.eos_token_id)
    broken = {k: v.clone() for k, v in batch.items()}
    broken["position_ids"][0, second["start"]] = 7
    with pytest.raises(LabelContractError, match="packed row 0, sample 1: position ids do not run"):
        check_pack(broken, 0, rows[0]["segments"], llama_tokenizer.eos_token_id)
    broken = {k: v.clone() for k, v in batch.items()}
    broken["labels"][0, 1] = broken["input_ids"][0, 1]  # a prompt token of the first sample
    with pytest.raises(LabelContractError, match="a prompt, template or padding token is a training target"):
        check_pack(broken, 0, rows[0]["segments"], llama_tokenizer.eos_token_id)


def _qwen2(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, initializer_range=0.3))


def _qwen3(tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(3)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                        max_position_embeddings=512, initializer_range=0.3))


def _gemma3_model(tokenizer):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(4)
    # A window of 4 tokens, shorter than every sample: the sliding layers must slide within each packed sample.
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
                              sliding_window=4, max_position_embeddings=512, initializer_range=0.3, pad_token_id=0)
    return Gemma3ForCausalLM(config)


FAMILIES = {"llama": make_tiny_llama, "qwen2": _qwen2, "qwen3": _qwen3, "gemma3": _gemma3_model}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_has_the_loss_and_gradients_of_its_samples(family, attention, llama_tokenizer):
    # float64, so rounding stays far below what a sample seeing another would change (attending across a boundary
    # fails this by orders of magnitude); eager attention still takes its softmax in fp32, hence atol 5e-5 below.
    model = FAMILIES[family](llama_tokenizer).eval().double()
    model.set_attn_implementation(attention)
    samples = _samples(llama_tokenizer, extra=6)
    # Unpacked: each sample alone, no padding at all.
    unpacked = Collator(llama_tokenizer)
    expected = sum(answer_only_loss(model, **unpacked([s]), num_items=1) for s in samples)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    rows, _ = pack(samples, 160)
    assert len(rows) < len(samples)  # several samples share a row
    batch = PackedCollator(llama_tokenizer, 192)(rows)  # padded past the samples: the padding must not matter
    batch.pop(PACKED_TOKENS)
    packed = answer_only_loss(model, **batch, num_items=1)
    packed.backward()
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-4)
    for p, g in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=5e-5)
    # The model's own loss on the packed batch (the path multi-process training takes) reads the same boundaries.
    full = model(**batch, use_cache=False).loss
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(full * trained, expected.detach(), rtol=1e-5, atol=1e-4)


def test_training_packs_when_asked_and_bloom_cannot(tiny_llama_dir, tiny_bloom_dir, tmp_path):
    from lmtune.training.train import train

    rows = QA * 6
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    lines: list[str] = []
    cfg = train_config(tiny_llama_dir, data, tmp_path / "packed",
                       **{"train.epochs": 2, "train.compile": False, "data.packing": True, "data.val_size": 2})
    result = train(cfg, log=lines.append)
    packing = [line for line in lines if line.startswith("packing:")]
    assert packing and "18 samples into" in packing[0] and "a micro-batch is one row" in packing[0], lines
    manifest = json.loads((tmp_path / "packed" / "lmtune_manifest.json").read_text())
    assert manifest["data"]["packing"]["length"] == 256 and manifest["data"]["packing"]["rows"] >= 1
    # one packed row per micro-batch: the steps follow the rows, not batch_size samples
    assert result.steps == manifest["optimizer_steps"] == 2 * manifest["data"]["packing"]["rows"]

    lines.clear()  # "auto" trains on padded micro-batches (measured faster on a CPU)
    train(train_config(tiny_llama_dir, data, tmp_path / "auto", **{"train.epochs": 1, "train.compile": False}),
          log=lines.append)
    assert not [line for line in lines if line.startswith("packing:")], lines
    with pytest.raises(LmtuneError, match="data.packing true: BLOOM's attention does not read packed rows"):
        train(train_config(tiny_bloom_dir, data, tmp_path / "bloom2", **{"data.packing": True}), log=lines.append)

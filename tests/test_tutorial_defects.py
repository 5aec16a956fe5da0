"""One test per defect of the tutorial's script, as listed in DESIGN.md ("The seed recipe and what is wrong with it")."""

import json
from pathlib import Path

import pytest
import torch
from conftest import QA, write_jsonl

from lmtune.config import build_config
from lmtune.data.collate import Collator
from lmtune.data.readers import Example, load_examples
from lmtune.data.template import PromptTemplate
from lmtune.data.tokenize import IGNORE_INDEX, tokenize_example, tokenize_examples
from lmtune.errors import DataError
from lmtune.model import add_lora, load_model, load_tokenizer, resolve_source


def _config(model_dir, data, out, **overrides):
    base = {"model.name_or_path": model_dir, "data.paths": [data], "train.output_dir": str(out), "train.epochs": 1,
            "train.batch_size": 2, "train.grad_accum": 1, "data.template": "plain"}
    return build_config(overrides={**base, **overrides})


def test_defect1_jsonl_data_is_found_and_an_empty_glob_is_an_error(tmp_path):
    # The tutorial globbed datasets/*.json next to a .jsonl file and silently found nothing.
    write_jsonl(tmp_path / "aicandy.jsonl", QA)
    with pytest.raises(DataError, match="matches no file"):
        load_examples([str(tmp_path / "*.json")])
    examples, _ = load_examples([str(tmp_path / "*.jsonl")])
    assert len(examples) == len(QA)
    # and a .json file holding JSON Lines (what the tutorial really had) is read too
    (tmp_path / "lines.json").write_text((tmp_path / "aicandy.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    assert len(load_examples([str(tmp_path / "lines.json")])[0]) == len(QA)


def test_defect2_batches_are_padded_to_their_longest_sample_not_512(bloom_tokenizer):
    template = PromptTemplate.for_tokenizer(bloom_tokenizer, "plain")
    samples = [tokenize_example(Example(r["question"], r["answer"]), bloom_tokenizer, template, 512) for r in QA]
    batch = Collator(bloom_tokenizer)(samples)
    longest = max(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape[1] == longest < 100
    padding_share = 1 - batch["attention_mask"].float().mean().item()
    assert padding_share < 0.5


def test_defect3_pad_is_not_eos_and_eos_is_a_target(tiny_bloom_dir, tiny_llama_pad_eos_dir):
    tok = load_tokenizer(resolve_source(tiny_bloom_dir))
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (3, 2, 1)  # untouched, BLOOM's own ids
    template = PromptTemplate.for_tokenizer(tok, "plain")
    samples = [tokenize_example(Example(r["question"], r["answer"]), tok, template, 512) for r in QA[:2]]
    batch = Collator(tok)(samples)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        assert batch["labels"][row, n - 1] == tok.eos_token_id  # EOS trained
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()  # <pad> (id 3) never a target
    assert not batch["labels"].eq(tok.pad_token_id).any()

    # A tokenizer whose pad IS its EOS (SmolLM2): masking by position still keeps the real EOS as a target.
    tok2 = load_tokenizer(resolve_source(tiny_llama_pad_eos_dir))
    assert tok2.pad_token_id == tok2.eos_token_id
    samples = [tokenize_example(Example(r["question"], r["answer"]), tok2, PromptTemplate(), 512) for r in QA[:2]]
    batch = Collator(tok2)(samples)
    short = min(range(2), key=lambda i: len(samples[i]["input_ids"]))
    n = len(samples[short]["input_ids"])
    assert batch["labels"][short, n - 1] == tok2.eos_token_id
    assert batch["input_ids"][short, n:].eq(tok2.eos_token_id).all()  # filler has the same id...
    assert batch["labels"][short, n:].eq(IGNORE_INDEX).all()  # ...but is masked by position


def test_defect4_loss_covers_only_the_answer(tiny_bloom_dir):
    tok = load_tokenizer(resolve_source(tiny_bloom_dir))
    model = load_model(resolve_source(tiny_bloom_dir))
    template = PromptTemplate.for_tokenizer(tok, "plain")
    samples = [tokenize_example(Example(r["question"], r["answer"]), tok, template, 512) for r in QA]
    batch = Collator(tok)(samples)
    with torch.no_grad():
        out = model(**batch)
    # The answer-only loss, computed by hand: predict token t+1 from position t, answer tokens only.
    logits = out.logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    is_answer = torch.zeros_like(targets, dtype=torch.bool)
    for row, s in enumerate(samples):
        is_answer[row, s["prompt_length"] - 1 : len(s["input_ids"]) - 1] = True
    by_hand = torch.nn.functional.cross_entropy(logits[is_answer], targets[is_answer])
    assert torch.allclose(out.loss, by_hand, atol=1e-5)
    whole = torch.nn.functional.cross_entropy(logits[batch["attention_mask"][:, 1:].bool()], targets[batch["attention_mask"][:, 1:].bool()])
    assert not torch.allclose(out.loss, whole, atol=1e-3)


def test_defect5_every_answer_ends_with_eos(bloom_tokenizer):
    template = PromptTemplate.for_tokenizer(bloom_tokenizer, "plain")
    samples, _ = tokenize_examples([Example(r["question"], r["answer"]) for r in QA], bloom_tokenizer, template, 512)
    for s in samples:
        assert s["input_ids"][-1] == s["labels"][-1] == bloom_tokenizer.eos_token_id
        assert s["input_ids"].count(bloom_tokenizer.eos_token_id) == 1


def test_defect6_generation_uses_the_models_own_eos_and_pad(tiny_bloom_dir, qa_file, tmp_path):
    from lmtune.export.merge import merge
    from lmtune.training.train import train

    train(_config(tiny_bloom_dir, qa_file, tmp_path / "adapter", **{"train.max_steps": 1}), log=lambda _: None)
    merge(str(tmp_path / "adapter"), str(tmp_path / "merged"), log=lambda _: None)
    generation = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 3  # not GPT-2's 50256
    assert generation.get("bos_token_id") == 1


def test_defect7_training_and_inference_prompts_are_the_same_ids(tiny_bloom_dir, qa_file, tmp_path):
    from lmtune.inference.load import load_for_inference
    from lmtune.training.methods.supervised import prepare_data

    config = _config(tiny_bloom_dir, qa_file, tmp_path / "adapter")
    tok = load_tokenizer(resolve_source(tiny_bloom_dir))
    prepared = prepare_data(config, tok, log=lambda _: None)
    prepared.template.save(tmp_path)
    loaded = load_for_inference(tiny_bloom_dir)  # no template there: falls back, like a model never tuned
    reloaded = PromptTemplate.load(tmp_path)
    for s, row in zip(prepared.samples, QA):
        at_inference = reloaded.prompt_ids(loaded.tokenizer, row["question"])
        assert s["input_ids"][: s["prompt_length"]] == at_inference
    text = reloaded.prompt_text(tok, "AI là gì?")
    assert not text.endswith(" ")  # no dangling space before the answer


def test_defect8_no_kbit_preparation_on_an_unquantized_model(tiny_bloom_dir):
    model = load_model(resolve_source(tiny_bloom_dir))
    peft_model = add_lora(model, 8, 32, 0.05, "none", "auto")
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in peft_model.parameters())
    assert not getattr(peft_model.base_model.model, "is_loaded_in_8bit", False)
    assert not peft_model.base_model.model.is_activation_checkpointing  # kbit prep would have switched it on
    assert {n.split(".")[-4] for n in trainable} == {"query_key_value"}  # BLOOM's attention projection


def test_defect9_no_remote_code_and_training_errors_are_raised(tiny_bloom_dir, qa_file, tmp_path, monkeypatch):
    assert build_config().model.trust_remote_code is False
    import transformers

    def broken_train(self, *a, **k):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(transformers.Trainer, "train", broken_train)
    from lmtune.training.train import train

    out = tmp_path / "adapter"
    with pytest.raises(RuntimeError, match="simulated"):
        train(_config(tiny_bloom_dir, qa_file, out), log=lambda _: None)
    assert not out.exists()  # no untrained adapter saved
    assert not any(p.name.startswith(".adapter") for p in Path(tmp_path).iterdir())  # no half-written folder either

"""merge(): merged logits equal base + adapter, plain transformers loads the result, a mismatch is refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import train_config

from lmtune.export.merge import MergeMismatchError, merge
from lmtune.training.train import train

QUIET = {"log": lambda _: None}


def test_merged_logits_equal_base_plus_adapter_and_load_with_plain_transformers(trained_bloom, tiny_bloom_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _, root, _ = trained_bloom
    merged_dir = root / "merged"
    merge(result.output_dir, str(merged_dir), **QUIET)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_bloom_dir), result.output_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir)
    ids = tokenizer(["Human: Học máy là gì?\nAssistant: Học máy"], return_tensors="pt")
    with torch.no_grad():
        a, b, c = merged(**ids).logits, with_adapter(**ids).logits, base(**ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)  # the merge carried the training
    assert (merged_dir / "lmtune_template.json").is_file()
    assert list(merged_dir.glob("*.safetensors"))


def test_merge_refuses_when_logits_differ(trained_bloom, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    result, _, _, _ = trained_bloom
    real = LoraModel.merge_and_unload

    def corrupt(self, *a, **k):
        model = real(self, *a, **k)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", corrupt)
    with pytest.raises(MergeMismatchError, match="nothing was written"):
        merge(result.output_dir, str(tmp_path / "merged"), **QUIET)
    assert not (tmp_path / "merged").exists()


def test_merge_tolerance_follows_the_scale_of_the_logits():
    from lmtune.export.merge import merge_tolerance

    assert merge_tolerance(torch.tensor([[0.5, -3.0]])) == pytest.approx(1e-3)  # small logits: 1e-3, no less
    assert merge_tolerance(torch.tensor([[35.6, -2.0]])) == pytest.approx(3.56e-3)  # fp32 rounding grows with them
    assert merge_tolerance(torch.tensor([[-80.0]])) < 0.01  # a wrong merge moves logits by tenths


def test_llama_without_pad_token_trains_and_merges(tiny_llama_dir, qa_file, tmp_path):
    result = train(train_config(tiny_llama_dir, qa_file, tmp_path / "a", **{"train.max_steps": 3, "lora.target_modules": "all-linear"}), **QUIET)
    assert result.steps == 3
    merge(str(tmp_path / "a"), str(tmp_path / "m"), **QUIET)
    generation = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert generation["pad_token_id"] == generation["eos_token_id"] == 2  # generation-only filler, masked by attention


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_merge_dtype_stores_smaller_weights_that_still_load(trained_bloom, tmp_path, capsys, dtype):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lmtune.cli import main

    result = trained_bloom[0]
    assert main(["merge", "--adapter", result.output_dir, "--output-dir", str(tmp_path / "full")]) == 0
    assert main(["merge", "--adapter", result.output_dir, "--output-dir", str(tmp_path / "half"), "--dtype", dtype]) == 0
    full, half = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "half" / "model.safetensors"))
    assert {t.dtype for t in full.values()} == {torch.float32}
    assert {t.dtype for t in half.values()} == {getattr(torch, dtype)}
    for name, value in full.items():
        assert torch.allclose(half[name].float(), value, rtol=1e-2, atol=1e-2), name  # the same weights, rounded
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "half").dtype == getattr(torch, dtype)

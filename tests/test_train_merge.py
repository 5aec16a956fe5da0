import json
from pathlib import Path

import pytest
import torch
from conftest import QA

import importlib

train_module = importlib.import_module("lmtune.train")  # the package re-exports train(), which hides the module attribute
from lmtune.config import GenerateConfig, build_config
from lmtune.errors import ModelError, OutputExistsError
from lmtune.generate import _finish, generate, generate_batch, load_for_inference
from lmtune.merge import MergeMismatchError, merge
from lmtune.model import add_lora, load_model, resolve_source
from lmtune.train import train

QUIET = {"log": lambda _: None}


def _config(model_dir, data, out, **overrides):
    base = {"model.name_or_path": model_dir, "data.paths": [data], "train.output_dir": str(out),
            "train.epochs": 10, "train.batch_size": 2, "train.grad_accum": 1, "train.learning_rate": 1e-2,
            "train.warmup_steps": 0, "lora.dropout": 0.0}
    return build_config(overrides={**base, **overrides})


@pytest.fixture(scope="module")
def trained_bloom(tiny_bloom_dir, tmp_path_factory):
    """One real training run on the tiny BLOOM, with a snapshot of every parameter right after LoRA was added."""
    root = tmp_path_factory.mktemp("run")
    from conftest import write_jsonl

    data = write_jsonl(root / "qa.jsonl", QA)
    snapshot = {}
    real_add_lora = train_module.add_lora

    def recording_add_lora(*args, **kwargs):
        model = real_add_lora(*args, **kwargs)
        snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return model

    train_module.add_lora = recording_add_lora
    try:
        result = train(_config(tiny_bloom_dir, data, root / "adapter"), **QUIET)
    finally:
        train_module.add_lora = real_add_lora
    return result, snapshot, root, data


def test_only_lora_parameters_changed_and_all_of_them(trained_bloom):
    result, before, _, _ = trained_bloom
    after = dict(result.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora
    for name, value in before.items():
        changed = not torch.equal(value, after[name].detach())
        assert changed == ("lora_" in name), name


def test_loss_falls(trained_bloom):
    result, _, _, _ = trained_bloom
    losses = [e["loss"] for e in result.log]
    assert len(losses) == result.steps == 20
    assert losses[-1] < 0.8 * losses[0]


def test_adapter_folder_holds_everything(trained_bloom):
    result, _, _, data = trained_bloom
    out = Path(result.output_dir)
    for name in ("adapter_model.safetensors", "adapter_config.json", "lmtune_config.yaml", "lmtune_manifest.json",
                 "lmtune_template.json", "train_log.jsonl", "loss.png", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "lmtune_manifest.json").read_text())
    assert manifest["data"]["rows_read"] == len(QA) and manifest["data"]["files"][0]["path"] == data
    assert len(manifest["data"]["files"][0]["sha256"]) == 64
    assert manifest["seed"] == 42 and manifest["final_loss"] == pytest.approx(result.final_loss)
    assert {"torch", "transformers", "peft"} <= set(manifest["versions"])
    assert manifest["started"] <= manifest["finished"]
    log_lines = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log_lines] == list(range(1, result.steps + 1))
    assert not list(out.parent.glob(".adapter.tmp-*"))


def test_existing_output_is_never_silently_overwritten(trained_bloom, tiny_bloom_dir):
    result, _, root, data = trained_bloom
    before = (Path(result.output_dir) / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        train(_config(tiny_bloom_dir, data, result.output_dir, **{"train.max_steps": 1}), **QUIET)
    assert (Path(result.output_dir) / "adapter_model.safetensors").read_bytes() == before
    with pytest.raises(OutputExistsError, match="already exists"):
        merge(result.output_dir, result.output_dir, **QUIET)


def test_overwrite_replaces_when_asked(tiny_bloom_dir, qa_file, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    train(_config(tiny_bloom_dir, qa_file, out, **{"train.max_steps": 1, "train.overwrite_output_dir": True}), **QUIET)
    assert not (out / "old.txt").exists() and (out / "adapter_model.safetensors").is_file()


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


def test_generation_uses_the_trained_template_and_batching_matches_one_by_one(trained_bloom):
    result, _, root, _ = trained_bloom
    loaded = load_for_inference(adapter=result.output_dir)
    assert loaded.template.kind == "plain"
    cfg = GenerateConfig(greedy=True, max_new_tokens=12, repetition_penalty=1.0)
    questions = [r["question"] for r in QA]
    batched = generate_batch(loaded, questions, cfg, batch_size=4)
    single = [generate(loaded, q, cfg) for q in questions]
    assert [a.text for a in batched] == [a.text for a in single]
    streamed = []
    answer = generate(loaded, questions[0], cfg, on_text=streamed.append)
    assert "".join(streamed).strip() == answer.text


def test_finish_stops_at_eos(bloom_tokenizer):
    from lmtune.data import PromptTemplate

    ids = bloom_tokenizer(" AI là", add_special_tokens=False)["input_ids"]
    answer = _finish(ids + [2, 3, 3], [2], bloom_tokenizer, PromptTemplate())
    assert answer.stopped_at_eos and answer.text == "AI là" and answer.new_tokens == len(ids)
    assert not _finish(ids, [2], bloom_tokenizer, PromptTemplate()).stopped_at_eos


def test_llama_lora_targets(tiny_llama_dir):
    model = load_model(resolve_source(tiny_llama_dir))
    names = lambda m: {n.split(".")[-4] for n, p in m.named_parameters() if p.requires_grad}
    assert names(add_lora(load_model(resolve_source(tiny_llama_dir)), 4, 8, 0.0, "none", "auto")) == {"q_proj", "v_proj"}
    assert names(add_lora(load_model(resolve_source(tiny_llama_dir)), 4, 8, 0.0, "none", "attention")) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert names(add_lora(model, 4, 8, 0.0, "none", "all-linear")) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ModelError, match=r"\['query_key_value'\] not found in LlamaForCausalLM; its linear layers are: .*q_proj"):
        add_lora(load_model(resolve_source(tiny_llama_dir)), 4, 8, 0.0, "none", ["query_key_value"])


def test_llama_without_pad_token_trains_and_merges(tiny_llama_dir, qa_file, tmp_path):
    result = train(_config(tiny_llama_dir, qa_file, tmp_path / "a", **{"train.max_steps": 3, "lora.target_modules": "all-linear"}), **QUIET)
    assert result.steps == 3
    merge(str(tmp_path / "a"), str(tmp_path / "m"), **QUIET)
    generation = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert generation["pad_token_id"] == generation["eos_token_id"] == 2  # generation-only filler, masked by attention


def test_dry_run_trains_nothing_and_estimates(tiny_bloom_dir, qa_file, tmp_path):
    lines = []
    result = train(_config(tiny_bloom_dir, qa_file, tmp_path / "a"), dry_run=True, log=lines.append)
    assert not (tmp_path / "a").exists()
    estimate = result.dry_run_estimate
    assert estimate["samples"] == len(QA) and estimate["optimizer_steps"] == 20 and estimate["seconds_per_epoch"] > 0
    text = "\n".join(lines)
    assert "ignored | Human: Trí tuệ nhân tạo (AI) là gì?" in text
    assert "trained |  AI là khả năng" in text and "</s>" in text
    assert "label contract holds on all 2 batches" in text

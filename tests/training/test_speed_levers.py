"""The CPU speed levers decide correctly: precision, threads, gradient checkpointing."""

import importlib

import torch

from lmtune.config import build_config
from lmtune.model import (
    Precision,
    choose_precision,
    configure_cpu_threads,
    load_model,
    physical_cores,
    resolve_source,
)

train_module = importlib.import_module("lmtune.training.train")


def _samples(length, n=4):
    return [{"input_ids": [5] * length} for _ in range(n)]


def test_checkpointing_only_when_activations_would_not_fit(tiny_bloom_dir, monkeypatch):
    model = load_model(resolve_source(tiny_bloom_dir))
    bf16 = Precision("cpu", torch.bfloat16)
    auto = build_config()
    assert auto.train.gradient_checkpointing == "auto"
    monkeypatch.setattr(train_module, "free_memory_bytes", lambda device: 8e9)
    assert not train_module.decide_checkpointing(auto, model, _samples(64), bf16)
    # 32 x 512 x 32 x (34 + 5*4*512/32) x 2 layers = about 2.2e8 bytes: more than half of 100 MB free
    big = build_config(overrides={"train.batch_size": 32})
    monkeypatch.setattr(train_module, "free_memory_bytes", lambda device: 1e8)
    assert train_module.decide_checkpointing(big, model, _samples(512), bf16)
    assert not train_module.decide_checkpointing(build_config(overrides={"gradient_checkpointing": False}), model, _samples(512), bf16)
    assert train_module.decide_checkpointing(build_config(overrides={"gradient_checkpointing": True}), model, _samples(8), bf16)


def test_threads_follow_physical_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert configure_cpu_threads() == physical_cores() >= 1
    finally:
        torch.set_num_threads(before)


def test_precision_choice_is_forced_or_automatic():
    assert choose_precision("cpu", "float32").compute_dtype == torch.float32
    assert choose_precision("cpu", "bfloat16").bf16
    auto = choose_precision("cpu", "auto")
    assert auto.device == "cpu" and auto.compute_dtype in (torch.bfloat16, torch.float32)


def test_bloom_gelu_swapped_for_the_fused_kernel_of_the_same_function(tiny_bloom_dir, bloom_tokenizer):
    from transformers import AutoModelForCausalLM
    from transformers.models.bloom.modeling_bloom import BloomGelu

    original = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir).train()  # train mode: BLOOM's own backward
    fused = load_model(resolve_source(tiny_bloom_dir)).train()
    assert any(isinstance(m, BloomGelu) for m in original.modules())
    assert not any(isinstance(m, BloomGelu) for m in fused.modules())
    assert sum(isinstance(m, torch.nn.GELU) and m.approximate == "tanh" for m in fused.modules()) == 2  # one per layer
    batch = bloom_tokenizer(["Học máy là gì?", "LoRA là kỹ thuật tinh chỉnh"], return_tensors="pt", padding=True)
    grads = []
    for model in (original, fused):
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        logits = out.logits
        if model is original:
            reference = logits.detach()
    torch.testing.assert_close(logits.detach(), reference, atol=1e-5, rtol=1e-5)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-4)

"""Generation: the trained template, batched answers equal one-by-one answers, stopping at EOS."""

from __future__ import annotations

from conftest import QA

from lmtune.config import GenerateConfig
from lmtune.data.template import PromptTemplate
from lmtune.inference.generate import generate, generate_batch
from lmtune.inference.load import load_for_inference


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


def test_a_row_stops_at_eos_and_keeps_what_came_before(bloom_tokenizer):
    from lmtune.inference.batching import Row, _advance
    from lmtune.inference.generate import _answer

    ids = bloom_tokenizer(" AI là", add_special_tokens=False)["input_ids"]
    row = Row([1], max_tokens=10, emit=lambda text, reason: None, strip=True)
    for token in ids + [2, 3, 3]:
        if not row.done:
            _advance(row, token, {2}, bloom_tokenizer)
    answer = _answer(row, PromptTemplate())
    assert answer.stopped_at_eos and answer.text == "AI là" and answer.new_tokens == len(ids)
    cut = Row([1], max_tokens=len(ids), emit=lambda text, reason: None, strip=True)
    for token in ids:
        _advance(cut, token, {2}, bloom_tokenizer)
    assert cut.finish_reason == "length" and not _answer(cut, PromptTemplate()).stopped_at_eos


def test_an_adapter_is_merged_for_answering_and_gives_the_adapters_logits(trained_bloom):
    import torch

    from lmtune.model import apply_adapter, base_model_of_adapter, load_model, resolve_source

    result, _, _, _ = trained_bloom
    loaded = load_for_inference(adapter=result.output_dir, dtype="float32")
    assert not any("lora_" in name for name, _ in loaded.model.named_parameters())  # merged, no LoRA layers left
    base = base_model_of_adapter(result.output_dir)
    unmerged = apply_adapter(load_model(resolve_source(base), dtype=torch.float32), result.output_dir, base).eval()
    assert any("lora_" in name for name, _ in unmerged.named_parameters())
    ids = loaded.tokenizer([r["question"] for r in QA], return_tensors="pt", padding=True)
    with torch.no_grad():
        merged_logits, adapter_logits = loaded.model(**ids).logits, unmerged(**ids).logits
    assert (merged_logits - adapter_logits).abs().max() < 1e-4
    # The adapter changed the model, so the equality above is not that of two untouched bases.
    with torch.no_grad():
        base_logits = load_model(resolve_source(base), dtype=torch.float32).eval()(**ids).logits
    assert (base_logits - adapter_logits).abs().max() > 1e-2

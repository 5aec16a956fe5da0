"""Conversations: OpenAI `messages` and ShareGPT `conversations` rows, trained on every assistant turn with the
prompt chat and serve would build, cut at turn boundaries, and every malformed conversation named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import QA, write_jsonl

from lmtune.data.collate import Collator, render_example
from lmtune.data.readers import load_examples
from lmtune.data.template import PromptTemplate
from lmtune.data.tokenize import IGNORE_INDEX, tokenize_examples
from lmtune.errors import DataError

REPO = Path(__file__).resolve().parents[2]
SYSTEM = "Trả lời ngắn gọn."
TURNS = [("Overfitting là gì?", "Là khi mô hình học thuộc dữ liệu huấn luyện."),
         ("Làm sao tránh nó?", "Dùng thêm dữ liệu, regularization hoặc early stopping."),
         ("Còn underfitting thì sao?", "Ngược lại: mô hình quá đơn giản để học được quy luật.")]


def openai_row(system: str = SYSTEM, turns=TURNS) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def sharegpt_row(system: str = SYSTEM, turns=TURNS) -> dict:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in openai_row(system, turns)["messages"]]}


def samples_of(path: str, tokenizer, max_length: int = 512, last_only: bool = False):
    examples, report = load_examples([path])
    template = PromptTemplate.for_tokenizer(tokenizer)
    samples, token_report = tokenize_examples(examples, tokenizer, template, max_length, last_only)
    return samples, token_report, template, examples


@pytest.mark.parametrize("tokenizer_name", ["bloom_tokenizer", "chat_tokenizer"])
def test_every_assistant_turn_is_trained_after_exactly_the_prompt_chat_builds(request, tmp_path, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    samples, _, template, _ = samples_of(write_jsonl(tmp_path / "c.jsonl", [openai_row()]), tokenizer)
    (sample,) = samples
    ids, labels, spans = sample["input_ids"], sample["labels"], sample["spans"]
    assert len(spans) == 3
    history = [{"role": "system", "content": SYSTEM}]
    for (question, answer), (start, end) in zip(TURNS, spans):
        history.append({"role": "user", "content": question})
        # the ids before each answer are what chat/serve send for that history
        assert ids[:start] == template.conversation_ids(tokenizer, history)
        assert ids[start:end] == template.answer_ids(tokenizer, answer)  # the answer and its EOS, trained
        history.append({"role": "assistant", "content": answer})
    trained = {i for start, end in spans for i in range(start, end)}
    assert [i for i, label in enumerate(labels) if label != IGNORE_INDEX] == sorted(trained)
    assert all(labels[i] == ids[i] for i in trained)
    assert ids[spans[-1][1] - 1] == tokenizer.eos_token_id and not sample["truncated"]
    batch = Collator(tokenizer)([sample, sample])  # the label contract holds (check_batch runs in the collator)
    assert batch["labels"].tolist()[0] == labels
    shown = render_example(sample, tokenizer)
    assert "in 3 assistant turns" in shown and shown.count("  trained | ") >= 3


def test_last_turn_only_trains_the_final_answer(tmp_path, bloom_tokenizer):
    (sample,), _, _, _ = samples_of(write_jsonl(tmp_path / "c.jsonl", [openai_row()]), bloom_tokenizer, last_only=True)
    (start, end), = sample["spans"]
    assert end == len(sample["input_ids"]) and all(label == IGNORE_INDEX for label in sample["labels"][:start])


def test_sharegpt_and_openai_give_the_same_samples(tmp_path, chat_tokenizer):
    a = samples_of(write_jsonl(tmp_path / "a.jsonl", [openai_row()]), chat_tokenizer)[0]
    b = samples_of(write_jsonl(tmp_path / "b.jsonl", [sharegpt_row()]), chat_tokenizer)[0]
    assert a == b


def test_pairs_and_conversations_mix_and_a_one_turn_conversation_is_the_pair(tmp_path, bloom_tokenizer):
    pair = QA[0]
    one_turn = {"messages": [{"role": "user", "content": pair["question"]}, {"role": "assistant", "content": pair["answer"]}]}
    samples, report, _, examples = samples_of(write_jsonl(tmp_path / "m.jsonl", [pair, one_turn, openai_row()]), bloom_tokenizer)
    assert len(samples) == 3 and report.conversations == 2
    assert samples[0]["input_ids"] == samples[1]["input_ids"] and samples[0]["labels"] == samples[1]["labels"]
    assert examples[2].question == TURNS[-1][0] and examples[2].answer == TURNS[-1][1]  # what eval asks and scores
    Collator(bloom_tokenizer)(samples)


def test_a_long_conversation_loses_whole_earlier_turns(tmp_path, bloom_tokenizer):
    full, _, template, _ = samples_of(write_jsonl(tmp_path / "c.jsonl", [openai_row()]), bloom_tokenizer)
    length = len(full[0]["input_ids"])
    samples, report, _, _ = samples_of(str(tmp_path / "c.jsonl"), bloom_tokenizer, max_length=length - 1)
    (sample,) = samples
    assert report.conversations_cut == 1 and report.turns_dropped == 1
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[1][0]}]
    start = sample["spans"][0][0]
    assert sample["input_ids"][:start] == template.conversation_ids(bloom_tokenizer, history)  # starts at turn 2
    assert len(sample["spans"]) == 2 and not sample["truncated"]


BAD = [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "turn 1: two user turns in a row"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]},
     "turn 2: the conversation ends with a user turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}, "turn 1: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}, "turn 1: empty assistant turn"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
     "turn 0: a conversation that starts with the assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}]},
     "turn 2: a system message after the first turn"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}, "turn 0: 'content' must be text, got missing"),
]


@pytest.mark.parametrize("row, message", BAD, ids=[m for _, m in BAD])
def test_every_malformed_conversation_is_named_with_file_line_and_turn(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [openai_row(), row])
    with pytest.raises(DataError, match=f"bad.jsonl:2: {message}"):
        load_examples([path])


def test_the_bundled_conversations_tokenize_under_the_contract(bloom_tokenizer, chat_tokenizer):
    path = str(REPO / "data" / "vi_ai_conversations.jsonl")
    for tokenizer in (bloom_tokenizer, chat_tokenizer):
        samples, report, _, _ = samples_of(path, tokenizer, max_length=2048)
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
        assert len(samples) == len(rows) == report.conversations
        assert [len(s["spans"]) for s in samples] == [sum(m["role"] == "assistant" for m in r["messages"]) for r in rows]
        Collator(tokenizer)(samples)


def test_inspect_and_clean_understand_conversations(tmp_path, tiny_bloom_dir):
    from lmtune.data.clean import clean_data
    from lmtune.data.inspect import format_report, inspect_data

    messy = openai_row(turns=[("Overfitting  là gì?", "Là khi mô hình học thuộc.\u200b")])
    rows = [openai_row(), sharegpt_row(turns=TURNS[:2]), openai_row(), messy, QA[0]]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    report = inspect_data([path], model=tiny_bloom_dir, max_length=64)
    assert report.conversations == 4 and report.turns_per_conversation.max == 3
    assert report.findings["exact_duplicate"].examples == [f"{path}:3 repeats {path}:1"]
    assert report.tokens.lengths.count == 5 and report.tokens.truncated >= 1  # the three-turn ones exceed 64 tokens
    assert "conversations: 4 of 5 rows" in format_report(report)
    out = tmp_path / "clean.jsonl"
    result = clean_data([path], str(out))
    kept = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert result.dropped["duplicate"] == 1 and len(kept) == 4
    assert kept[1] == sharegpt_row(turns=TURNS[:2])  # ShareGPT stays ShareGPT
    assert kept[2]["messages"][1]["content"] == "Overfitting là gì?" and kept[2]["messages"][2]["content"] == "Là khi mô hình học thuộc."
    assert kept[3] == QA[0]


def test_training_on_conversations_runs_under_the_contract(tmp_path, tiny_llama_dir):
    from conftest import train_config

    from lmtune.training.train import train

    lines = []
    config = train_config(tiny_llama_dir, str(REPO / "data" / "vi_ai_conversations.jsonl"), tmp_path / "a",
                          **{"train.max_steps": 2, "data.max_length": 256})
    result = train(config, log=lines.append)
    assert result.steps == 2
    assert any("48 conversations (every assistant turn trained)" in line for line in lines)
    assert any("assistant turns" in line for line in lines)  # the pre-flight shows a multi-turn sample


def test_eval_asks_a_conversation_its_last_question_after_the_earlier_turns(tmp_path, tiny_llama_dir):
    from lmtune.config import GenerateConfig
    from lmtune.evaluation.evaluate import evaluate_model
    from lmtune.inference.generate import generate_batch
    from lmtune.inference.load import load_for_inference

    loaded = load_for_inference(tiny_llama_dir, dtype="float32")
    examples, _ = load_examples([write_jsonl(tmp_path / "c.jsonl", [openai_row(), QA[1]])])
    cfg = GenerateConfig(greedy=True, max_new_tokens=6, repetition_penalty=1.0)
    result = evaluate_model(loaded, examples, cfg, "tuned")
    history = openai_row()["messages"][:-1]
    expected = generate_batch(loaded, [history, QA[1]["question"]], cfg)
    assert [a.text for a in result.answers] == [a.text for a in expected]
    from lmtune.inference.generate import _row

    # the earlier turns are in the prompt: exactly chat's ids for that history, not the last question alone
    prompt = _row(loaded, history, cfg).prompt_ids
    assert prompt == loaded.template.conversation_ids(loaded.tokenizer, history)
    assert len(prompt) > len(loaded.template.prompt_ids(loaded.tokenizer, TURNS[-1][0]))

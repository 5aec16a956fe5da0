import json

import pytest
import torch
from conftest import QA, write_jsonl

from lmtune.data import (
    IGNORE_INDEX,
    Collator,
    Example,
    PromptTemplate,
    check_batch,
    load_examples,
    tokenize_example,
    tokenize_examples,
)
from lmtune.errors import DataError, LabelContractError

# ---------------------------------------------------------------- column detection


@pytest.mark.parametrize(
    "row,expected",
    [
        ({"question": "Q?", "answer": "A."}, ("Q?", "A.", "")),
        ({"input": "Q?", "output": "A.", "context": "C"}, ("Q?", "A.", "C")),
        ({"input": "Q?", "output": "A."}, ("Q?", "A.", "")),
        ({"prompt": "Q?", "response": "A."}, ("Q?", "A.", "")),
        ({"instruction": "Q?", "input": "C", "output": "A."}, ("Q?", "A.", "C")),
        ({"prompt": "Q?", "completion": "A."}, ("Q?", "A.", "")),
    ],
    ids=["question/answer", "input/output/context", "input/output", "prompt/response", "alpaca", "prompt/completion"],
)
def test_columns_detected_without_configuration(tmp_path, row, expected):
    examples, _ = load_examples([write_jsonl(tmp_path / "d.jsonl", [row])])
    e = examples[0]
    assert (e.question, e.answer, e.context) == expected


def test_explicit_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"hoi": "Q?", "dap": "A."}])
    examples, _ = load_examples([path], question_field="hoi", answer_field="dap")
    assert (examples[0].question, examples[0].answer) == ("Q?", "A.")


def test_unknown_columns_error_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"a": 1, "b": 2}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: cannot tell question and answer columns apart"):
        load_examples([path])


def test_shared_alpaca_sample_trains_without_options():
    from conftest import SHARED_DATA

    path = SHARED_DATA / "vi_alpaca_sample.jsonl"
    if not path.is_file():
        pytest.skip("../shared/data is not beside the checkout")
    examples, report = load_examples([str(path)])
    assert report.columns[:2] == ("prompt", "response")
    assert len(examples) == 1000


# ---------------------------------------------------------------- bad input


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(QA[0]) + "\n" + '{"question": "x", "answer": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        load_examples([str(path)])


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [QA[0], {"question": "Q?"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'answer'"):
        load_examples([path])


@pytest.mark.parametrize("value,kind", [(None, "null"), (42, "int")])
def test_non_text_field_is_rejected(tmp_path, value, kind):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": value}])
    with pytest.raises(DataError, match=rf"d\.jsonl:1: field 'answer' must be text, got {kind}"):
        load_examples([path])


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('"just a string"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected a JSON object"):
        load_examples([str(path)])


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_examples([str(tmp_path / "nope.jsonl")])
    with pytest.raises(DataError, match=r"\*\.json: the pattern matches no file"):
        load_examples([str(tmp_path / "*.json")])


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"question": "Tr\u00ed", "answer": "x"}\n'.encode("cp1258"))
    with pytest.raises(DataError, match=r"d\.jsonl:1: not UTF-8"):
        load_examples([str(path)])


def test_bom_and_crlf_are_tolerated(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in QA).encode("utf-8") + b"\r\n")
    examples, _ = load_examples([str(path)])
    assert [e.question for e in examples] == [r["question"] for r in QA]


def test_empty_rows_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [QA[0], {"question": "Q?", "answer": "   "}])
    examples, report = load_examples([path])
    assert len(examples) == 1 and report.skipped_empty == 1


def test_all_empty_answers_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": ""}])
    with pytest.raises(DataError, match="nothing to train on"):
        load_examples([path])


def test_json_array_csv_and_parquet(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(QA, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "b.csv").write_text("question,answer\n" + "\n".join(f'"{r["question"]}","{r["answer"]}"' for r in QA), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(QA), tmp_path / "c.parquet")
    for name in ("a.json", "b.csv", "c.parquet"):
        examples, _ = load_examples([str(tmp_path / name)])
        assert [(e.question, e.answer) for e in examples] == [(r["question"], r["answer"]) for r in QA], name


def test_glob_reads_all_matching_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", QA[:2])
    write_jsonl(tmp_path / "b.jsonl", QA[2:])
    examples, report = load_examples([str(tmp_path / "*.jsonl")])
    assert len(examples) == len(QA) and len(report.files) == 2


# ---------------------------------------------------------------- labels


def _sample(tokenizer, question="Học máy là gì?", answer="Học máy giúp máy tính học từ dữ liệu.", max_length=512):
    template = PromptTemplate.for_tokenizer(tokenizer, "plain")
    return template, tokenize_example(Example(question, answer), tokenizer, template, max_length)


def test_labels_are_masked_exactly_on_the_prompt(bloom_tokenizer):
    template, s = _sample(bloom_tokenizer)
    prompt = template.prompt_ids(bloom_tokenizer, "Học máy là gì?")
    answer = bloom_tokenizer(" Học máy giúp máy tính học từ dữ liệu.", add_special_tokens=False)["input_ids"]
    assert s["input_ids"] == prompt + answer + [bloom_tokenizer.eos_token_id]
    assert s["labels"] == [IGNORE_INDEX] * len(prompt) + answer + [bloom_tokenizer.eos_token_id]
    assert s["prompt_length"] == len(prompt)


def test_collator_pads_right_per_batch_and_masks_padding(bloom_tokenizer):
    template = PromptTemplate.for_tokenizer(bloom_tokenizer, "plain")
    samples = [tokenize_example(Example(r["question"], r["answer"]), bloom_tokenizer, template, 512) for r in QA]
    batch = Collator(bloom_tokenizer)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (len(QA), max(lengths))  # dynamic, never a fixed 512
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
        assert batch["input_ids"][row, n:].eq(bloom_tokenizer.pad_token_id).all()
        assert batch["labels"][row, n - 1] == bloom_tokenizer.eos_token_id


def test_truncation_cuts_the_answer_not_the_prompt(bloom_tokenizer):
    template, full = _sample(bloom_tokenizer)
    p = full["prompt_length"]
    _, cut = _sample(bloom_tokenizer, max_length=p + 3)
    assert cut["input_ids"] == full["input_ids"][: p + 3] and cut["truncated"]
    assert cut["labels"][:p] == [IGNORE_INDEX] * p


def test_prompt_longer_than_max_length_is_dropped_not_cut(bloom_tokenizer):
    template = PromptTemplate.for_tokenizer(bloom_tokenizer, "plain")
    examples = [Example("rất dài " * 100, "ngắn"), Example("Q?", "A.")]
    samples, report = tokenize_examples(examples, bloom_tokenizer, template, max_length=32)
    assert report.dropped_long_prompt == 1 and len(samples) == 1


@pytest.mark.parametrize(
    "break_it,reason",
    [
        (lambda b: b["labels"].__setitem__((0, 0), 5), "a prompt token is a training target"),
        (lambda b: b["labels"].__setitem__((1, -1), 7), "a padding position is a training target"),
        (lambda b: (b["labels"].__setitem__((0, -1), 5), b["input_ids"].__setitem__((0, -1), 5)), "does not end with EOS"),
        (lambda b: b["attention_mask"].__setitem__((0, 0), 0), "padding is not only on the right"),
    ],
    ids=["prompt-target", "padding-target", "no-eos", "left-padding"],
)
def test_check_batch_catches_each_violation(bloom_tokenizer, break_it, reason):
    template = PromptTemplate.for_tokenizer(bloom_tokenizer, "plain")
    long, short = Example("Câu hỏi dài hơn một chút là gì vậy?", "Trả lời dài hơn."), Example("Q?", "A.")
    samples = [tokenize_example(e, bloom_tokenizer, template, 512) for e in (long, short)]
    batch = Collator(bloom_tokenizer, check=False)(samples)
    check_batch(batch, [s["prompt_length"] for s in samples], [False, False], bloom_tokenizer.eos_token_id)
    break_it(batch)
    with pytest.raises(LabelContractError, match=reason):
        check_batch(batch, [s["prompt_length"] for s in samples], [False, False], bloom_tokenizer.eos_token_id)


def test_check_batch_rejects_fixed_width_padding(bloom_tokenizer):
    template, s = _sample(bloom_tokenizer)
    batch = Collator(bloom_tokenizer, check=False)([s])
    padded = {k: torch.nn.functional.pad(v, (0, 10), value=IGNORE_INDEX if k == "labels" else 0) for k, v in batch.items()}
    with pytest.raises(LabelContractError, match="not dynamic"):
        check_batch(padded, [s["prompt_length"]], [False], bloom_tokenizer.eos_token_id)


def test_chat_template_is_used_when_the_tokenizer_has_one(llama_tokenizer):
    import copy

    tok = copy.deepcopy(llama_tokenizer)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}<assistant>"
    template = PromptTemplate.for_tokenizer(tok, "auto")
    assert template.kind == "chat"
    assert template.prompt_text(tok, "Q?") == "<user>Q?</s><assistant>"
    with pytest.raises(DataError, match="no chat template"):
        PromptTemplate.for_tokenizer(llama_tokenizer, "chat")


def test_template_round_trips_through_a_folder(tmp_path, bloom_tokenizer):
    template = PromptTemplate.for_tokenizer(bloom_tokenizer, "plain", system_prompt="Trả lời ngắn gọn.")
    template.save(tmp_path)
    assert PromptTemplate.load(tmp_path) == template

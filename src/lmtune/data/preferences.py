"""Preference data: which of two answers to a prompt is better (DPO, ORPO), or whether one answer is good (KTO).

Layouts found without configuration, with the field's usual names (TRL's and the hub's):

  {"prompt" | "question" | "instruction", "chosen", "rejected"}        two answers as text
  {"prompt": [messages], "chosen": [assistant turn], "rejected": [...]}  conversational: the prompt as turns
  {"chosen": [whole conversation], "rejected": [whole conversation]}    the hub layout: the turns both share are
                                                                       the prompt, the last assistant turns differ
  {"prompt", "completion", "label": true | false}                       one answer marked good or bad (KTO)

Files are read as for supervised data (JSONL, JSON, CSV, parquet, `hub:`; `data.readers.iter_records`). Samples keep
the label contract of `data.tokenize`: prompt ids exactly as chat and serve build them for the same turns
(`PromptTemplate.conversation_ids`), each answer's ids + EOS as the only trained tokens.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..errors import DataError
from .collate import Collator
from .readers import LoadReport, iter_records, read_messages, resolve_paths
from .template import PromptTemplate
from .tokenize import IGNORE_INDEX, TokenizeReport

PROMPT_FIELDS = ("prompt", "question", "instruction", "input")
PAIRED = ("chosen", "rejected")
UNPAIRED = ("completion", "label")


@dataclass
class PreferenceExample:
    where: str  # "file:line", for messages
    prompt: list[dict]  # the turns before the answer, ending with the user's (an optional system message first)
    chosen: str  # the better answer; for an unpaired row, its one answer
    rejected: str | None = None  # None for an unpaired row
    label: bool | None = None  # unpaired rows: whether the answer is a good one

    @property
    def paired(self) -> bool:
        return self.rejected is not None

    @property
    def question(self) -> str:
        """The last user turn: what `data.split` groups rows by, so that a prompt's rows stay on one side."""
        return self.prompt[-1]["content"]


def preference_layout(record: dict) -> str | None:
    """'paired', 'unpaired' or None (not preference data) from a record's keys."""
    keys = {str(k).strip().casefold() for k in record}
    if {"chosen", "rejected"} <= keys:
        return "paired"
    if {"completion", "label"} <= keys:
        return "unpaired"
    return None


def _field(record: dict, name: str) -> Any:
    folded = {str(k).strip().casefold(): k for k in record}
    return record[folded[name]] if name in folded else None


def _as_text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        kind = "missing" if value is None else type(value).__name__
        raise DataError(f"{where}: field '{name}' must be text or a list of turns, got {kind}")
    if not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def _prompt_turns(record: dict, where: str) -> list[dict] | None:
    """The prompt as turns, or None when the record has no prompt field (the hub layout carries it in the answers)."""
    name = next((n for n in PROMPT_FIELDS if _field(record, n) is not None), None)
    if name is None:
        return None
    value = _field(record, name)
    if isinstance(value, list):
        turns = read_messages(value + [{"role": "assistant", "content": "-"}], where, name)[:-1]
        if turns[-1]["role"] != "user":
            raise DataError(f"{where}: field '{name}' must end with the user's turn")
        return turns
    return [{"role": "user", "content": _as_text(value, where, name)}]


def _answer(value: Any, where: str, name: str, prompt: list[dict] | None) -> tuple[list[dict] | None, str]:
    """(the turns before the answer when the field holds a whole conversation, else None; the answer's text)."""
    if isinstance(value, list):
        if value and isinstance(value[-1], dict) and len(value) == 1:  # [{"role": "assistant", "content": ...}]
            turns = read_messages([{"role": "user", "content": "-"}] + value, where, name)
            return None, turns[-1]["content"]
        turns = read_messages(value, where, name)  # a whole conversation ending with the assistant's answer
        return turns[:-1], turns[-1]["content"]
    if isinstance(value, dict):
        return _answer([value], where, name, prompt)
    return None, _as_text(value, where, name)


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().casefold()
    if text in ("true", "1", "yes", "good", "desirable"):
        return True
    if text in ("false", "0", "no", "bad", "undesirable"):
        return False
    raise DataError(f"{where}: field 'label' must be true or false, got {value!r}")


def read_preference(record: dict, where: str) -> PreferenceExample:
    """One record as a PreferenceExample; DataError naming the record and field otherwise."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with prompt, chosen and rejected, got {type(record).__name__}")
    layout = preference_layout(record)
    if layout is None:
        raise DataError(f"{where}: not preference data: expected the fields prompt, chosen and rejected (or prompt, "
                        f"completion and label for unpaired rows), got {sorted(map(str, record))}")
    prompt = _prompt_turns(record, where)
    if layout == "unpaired":
        history, completion = _answer(_field(record, "completion"), where, "completion", prompt)
        prompt = prompt or history
        if not prompt:
            raise DataError(f"{where}: missing field 'prompt'")
        return PreferenceExample(where, _nfc(prompt), _nfc_text(completion), None, _label(_field(record, "label"), where))
    chosen_history, chosen = _answer(_field(record, "chosen"), where, "chosen", prompt)
    rejected_history, rejected = _answer(_field(record, "rejected"), where, "rejected", prompt)
    if prompt is None:
        if not chosen_history:
            raise DataError(f"{where}: missing field 'prompt' (or chosen/rejected as whole conversations)")
        if chosen_history != rejected_history:
            raise DataError(f"{where}: chosen and rejected are conversations whose turns before the answer differ; "
                            "they must share the prompt")
        prompt = chosen_history
    return PreferenceExample(where, _nfc(prompt), _nfc_text(chosen), _nfc_text(rejected))


def _nfc_text(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _nfc(turns: list[dict]) -> list[dict]:
    return [{**t, "content": _nfc_text(t["content"])} for t in turns]


def load_preferences(patterns: Iterable[str], max_samples: int = 0, csv_delimiter: str = "",
                     ) -> tuple[list[PreferenceExample], LoadReport]:
    """Every row of the files as a PreferenceExample; the first bad row raises a DataError naming file and line."""
    files = resolve_paths(list(patterns))
    report = LoadReport(files=files)
    examples: list[PreferenceExample] = []
    for path in files:
        for where, record in iter_records(path, csv_delimiter=csv_delimiter):
            report.rows_read += 1
            examples.append(read_preference(record, where))
            if max_samples and len(examples) >= max_samples:
                return examples, report
    if not examples:
        raise DataError(f"{', '.join(files)}: no preference rows")
    kinds = {e.paired for e in examples}
    if len(kinds) > 1:
        first_unpaired = next(e for e in examples if not e.paired)
        raise DataError(f"{first_unpaired.where}: an unpaired row (prompt, completion, label) among paired ones "
                        "(prompt, chosen, rejected); keep each kind in its own file")
    return examples, report


# ---------------------------------------------------------------- tokenizing


def _answer_sample(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> tuple[list[int], list[int], bool] | None:
    if len(prompt_ids) >= max_length - 1:
        return None
    truncated = len(prompt_ids) + len(answer_ids) > max_length
    answer_ids = answer_ids[: max_length - len(prompt_ids)]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids, truncated


def tokenize_preference(example: PreferenceExample, tokenizer, template: PromptTemplate, max_length: int) -> dict | None:
    """{'input_ids', 'labels', 'prompt_length', 'truncated'} of the chosen (or only) answer, with 'rejected_input_ids',
    'rejected_labels', 'rejected_truncated' for a pair, or 'label' for an unpaired row; None when the prompt alone
    leaves no room for an answer."""
    prompt = template.conversation_ids(tokenizer, example.prompt)  # exactly what chat and serve send
    chosen = _answer_sample(prompt, template.answer_ids(tokenizer, example.chosen), max_length)
    if chosen is None:
        return None
    sample = {"input_ids": chosen[0], "labels": chosen[1], "prompt_length": len(prompt), "truncated": chosen[2]}
    if example.paired:
        rejected = _answer_sample(prompt, template.answer_ids(tokenizer, example.rejected), max_length)
        sample.update(rejected_input_ids=rejected[0], rejected_labels=rejected[1], rejected_truncated=rejected[2])
    else:
        sample["label"] = bool(example.label)
    return sample


def tokenize_preferences(examples: list[PreferenceExample], tokenizer, template: PromptTemplate, max_length: int,
                         ) -> tuple[list[dict], TokenizeReport]:
    report = TokenizeReport()
    samples = []
    for example in examples:
        sample = tokenize_preference(example, tokenizer, template, max_length)
        if sample is None:
            report.dropped_long_prompt += 1
            continue
        for side in ("", "rejected_") if "rejected_input_ids" in sample else ("",):
            report.tokens += len(sample[f"{side}input_ids"])
            report.trained_tokens += len(sample[f"{side}input_ids"]) - sample["prompt_length"]
            report.truncated += sample[f"{side}truncated"]
        samples.append(sample)
    report.samples = len(samples)
    if not samples:
        raise DataError(f"every prompt is longer than data.max_length={max_length} tokens; nothing would be trained. "
                        "Raise data.max_length")
    return samples, report


@dataclass
class PreferenceCollator:
    """Chosen and rejected answers of a batch as one batch of 2 x rows (chosen first), so that one forward pass
    computes both; unpaired rows as one batch with their labels. Every half keeps the label contract (checked)."""
    tokenizer: Any
    check: bool = True
    _sft: Collator = field(init=False)

    def __post_init__(self):
        self._sft = Collator(self.tokenizer, check=self.check)

    def __call__(self, samples: list[dict]) -> dict:
        import torch

        sides = [samples]
        if "rejected_input_ids" in samples[0]:
            sides.append([{"input_ids": s["rejected_input_ids"], "labels": s["rejected_labels"],
                           "prompt_length": s["prompt_length"], "truncated": s["rejected_truncated"]} for s in samples])
        batches = [self._sft(side) for side in sides]  # each half padded to its own longest and checked
        width = max(b["input_ids"].shape[1] for b in batches)
        pad = self._sft.pad_id

        def widen(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

        batch = {"input_ids": torch.cat([widen(b["input_ids"], pad) for b in batches]),
                 "attention_mask": torch.cat([widen(b["attention_mask"], 0) for b in batches]),
                 "labels": torch.cat([widen(b["labels"], IGNORE_INDEX) for b in batches])}
        if "kl_input_ids" in samples[0]:  # KTO's mismatched answers, a batch of their own (no gradient)
            kl = self._sft([{"input_ids": s["kl_input_ids"], "labels": s["kl_labels"], "prompt_length": s["kl_prompt_length"],
                             "truncated": True} for s in samples])
            batch.update(kl_input_ids=kl["input_ids"], kl_attention_mask=kl["attention_mask"], kl_labels=kl["labels"])
            if "reference_kl_logp" in samples[0]:
                batch["reference_kl_logp"] = torch.tensor([s["reference_kl_logp"] for s in samples], dtype=torch.float32)
        if "label" in samples[0]:
            batch["preference_label"] = torch.tensor([bool(s["label"]) for s in samples])
        if "reference_logp" in samples[0]:
            batch["reference_logp"] = torch.tensor([s["reference_logp"] for s in samples]
                                                   + [s["reference_rejected_logp"] for s in samples if "rejected_input_ids" in s],
                                                   dtype=torch.float32)
        return batch

"""The prompt template: the one function that turns a question (or a conversation) into prompt ids,
for training and for inference alike, so the token boundary before the answer is always the same."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from .normalize import nfc

PLAIN_PROMPT = "Human: {question}\nAssistant:"
# The separator belongs to the answer, so the prompt never ends in a dangling space: BPE
# tokenizers (BLOOM, GPT-2) glue a leading space to the next word, and a trailing space at the
# end of the prompt would become a token that training never saw before an answer word.
PLAIN_ANSWER_PREFIX = " "
TEMPLATE_FILE = "lmtune_template.json"


@dataclass
class PromptTemplate:
    """The one function that turns a question into prompt ids, for training and for inference alike."""

    kind: str = "plain"  # "plain" or "chat"
    prompt: str = PLAIN_PROMPT
    answer_prefix: str = PLAIN_ANSWER_PREFIX
    system_prompt: str = ""
    chat_template: str | None = None  # stored so prompts are rebuilt exactly even if the tokenizer changes

    @classmethod
    def for_tokenizer(cls, tokenizer, choice: str = "auto", system_prompt: str = "") -> "PromptTemplate":
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if choice == "chat" and not has_chat:
            raise DataError("data.template is 'chat' but this tokenizer has no chat template; use 'plain' or 'auto'")
        if choice == "chat" or (choice == "auto" and has_chat):
            return cls(kind="chat", prompt="", answer_prefix="", system_prompt=system_prompt, chat_template=tokenizer.chat_template)
        return cls(kind="plain", system_prompt=system_prompt)

    def user_text(self, question: str, context: str = "") -> str:
        # NFC here, where every prompt is built (training, generate, chat, serve, eval): a question typed in
        # decomposed Unicode gets the same ids, and so the same answer, as the same question typed normally.
        question, context = nfc(question), nfc(context)
        return f"{question}\n\n{context}" if context else question

    def prompt_text(self, tokenizer, question: str, context: str = "") -> str:
        user = self.user_text(question, context)
        system_prompt = nfc(self.system_prompt)
        if self.kind == "chat":
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": user}
            ]
            return tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
            )
        text = self.prompt.format(question=user)
        return f"{system_prompt}\n{text}" if system_prompt else text

    def prompt_ids(self, tokenizer, question: str, context: str = "") -> list[int]:
        text = self.prompt_text(tokenizer, question, context)
        # A rendered chat template already holds its special tokens; a plain prompt gets the
        # tokenizer's usual BOS (if it adds one).
        return tokenizer(text, add_special_tokens=self.kind != "chat")["input_ids"]

    def conversation_ids(self, tokenizer, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids for a multi-turn conversation ending with a user message (chat and serve).

        `messages` are {"role": "system"|"user"|"assistant", "content": str}, user and assistant
        alternating. One user message gives exactly `prompt_ids(question)`. Plain templates join
        turns as training builds one sample: prompt ids + answer ids (answer prefix, answer, EOS).
        """
        messages = [{**m, "content": nfc(m["content"])} if isinstance(m.get("content"), str) else m for m in messages]
        system, turns = _split_turns(messages, nfc(self.system_prompt))
        if self.kind == "chat":
            chat = [{"role": "system", "content": system}] if system else []
            for question, answer in turns:
                chat += [{"role": "user", "content": question}] + ([{"role": "assistant", "content": answer}] if answer is not None else [])
            try:
                text = tokenizer.apply_chat_template(chat, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # jinja raises its own errors for conversations a template refuses
                raise DataError(f"the model's chat template refuses this conversation: {e}") from None
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        first = PromptTemplate(**{**self.to_dict(), "system_prompt": system})
        ids: list[int] = []
        for number, (question, answer) in enumerate(turns):
            # Later turns start like every training sample (BOS if the tokenizer adds one), without the system line.
            ids += first.prompt_ids(tokenizer, question) if number == 0 else tokenizer(self.prompt.format(question=question))["input_ids"]
            if answer is not None:
                ids += self.answer_ids(tokenizer, answer)
        return ids

    def answer_ids(self, tokenizer, answer: str) -> list[int]:
        """The answer's ids followed by EOS: the model must learn to stop."""
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; the model could never learn to stop")
        ids = tokenizer(self.answer_prefix + nfc(answer), add_special_tokens=False)["input_ids"]
        return ids + [tokenizer.eos_token_id]

    def clean_answer(self, text: str) -> str:
        # An answer cut at the token limit inside a multi-byte character decodes with a trailing U+FFFD whose
        # missing bytes never come: dropped, as chat and serve drop it (inference.batching._finish).
        return text.strip().rstrip("\ufffd").rstrip()

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def save(self, folder: str | Path) -> None:
        Path(folder, TEMPLATE_FILE).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> "PromptTemplate | None":
        path = Path(folder, TEMPLATE_FILE)
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def _split_turns(messages: list[dict[str, str]], default_system: str) -> tuple[str, list[tuple[str, str | None]]]:
    """(system text, [(question, answer or None)]) from chat messages; DataError if they do not alternate."""
    system, first = default_system, 0
    if messages and messages[0].get("role") == "system":
        system, first = messages[0].get("content", ""), 1
    turns: list[tuple[str, str | None]] = []
    for index, message in enumerate(messages[first:]):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise DataError(f"message {index + first}: expected role '{expected}' (a system message may come first, then user and "
                            f"assistant alternate), got '{message.get('role')}'")
        if expected == "user":
            turns.append((message.get("content", ""), None))
        else:
            turns[-1] = (turns[-1][0], message.get("content", ""))
    if not turns or turns[-1][1] is not None:
        raise DataError("the conversation must end with a user message")
    return system, turns

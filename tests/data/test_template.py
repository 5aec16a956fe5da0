"""The prompt template: one function for training and inference prompts, single questions and conversations."""

from __future__ import annotations

import copy

import pytest
from conftest import conversation

from lmtune.data.template import PromptTemplate
from lmtune.errors import DataError


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


@pytest.mark.parametrize("system", ["", "Bạn là trợ lý AI."])
@pytest.mark.parametrize("tokenizer_name", ["bloom_tokenizer", "llama_tokenizer", "chat_tokenizer"])
def test_one_turn_conversation_is_exactly_the_training_prompt(request, tokenizer_name, system):
    tokenizer = request.getfixturevalue(tokenizer_name)
    template = PromptTemplate.for_tokenizer(tokenizer, "auto", system_prompt=system)
    assert template.kind == ("chat" if tokenizer_name == "chat_tokenizer" else "plain")
    for question in ["Học máy là gì?", "What is LoRA?", "  spaces  "]:
        assert template.conversation_ids(tokenizer, conversation(question)) == template.prompt_ids(tokenizer, question)


def test_plain_turns_are_joined_like_training_samples(llama_tokenizer):
    template = PromptTemplate.for_tokenizer(llama_tokenizer, "plain", system_prompt="Hệ thống.")
    ids = template.conversation_ids(llama_tokenizer, conversation("Học máy là gì?", "Một nhánh của AI.", "LoRA là gì?"))
    first_sample = template.prompt_ids(llama_tokenizer, "Học máy là gì?") + template.answer_ids(llama_tokenizer, "Một nhánh của AI.")
    # Later turns repeat the training prompt without the system line; the EOS of each answer separates turns.
    assert ids == first_sample + llama_tokenizer("Human: LoRA là gì?\nAssistant:")["input_ids"]
    assert ids.count(llama_tokenizer.eos_token_id) == 1


def test_chat_turns_use_the_chat_template_with_every_message(chat_tokenizer):
    template = PromptTemplate.for_tokenizer(chat_tokenizer, "auto")
    messages = [{"role": "system", "content": "Hãy trả lời ngắn."}, *conversation("Học máy là gì?", "Một nhánh của AI.", "Còn LoRA?")]
    text = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert template.conversation_ids(chat_tokenizer, messages) == chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert text.endswith("<s>user\nCòn LoRA?</s>\n<s>assistant\n")


@pytest.mark.parametrize("messages", [
    [],
    conversation("a", "b"),  # ends with the assistant
    [{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}, {"role": "user", "content": "b"}],
])
def test_conversations_that_do_not_alternate_are_refused(llama_tokenizer, messages):
    with pytest.raises(DataError):
        PromptTemplate.for_tokenizer(llama_tokenizer).conversation_ids(llama_tokenizer, messages)


@pytest.mark.parametrize("kind", ["plain", "chat"])
def test_decomposed_unicode_gives_the_same_prompt_and_answer_ids(llama_tokenizer, kind):
    """Text typed in NFD (Unikey's "Unicode tổ hợp") is tokenized as the NFC text it looks like, everywhere."""
    import unicodedata

    tok = copy.deepcopy(llama_tokenizer)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}<assistant>"
    template = PromptTemplate.for_tokenizer(tok, kind, system_prompt="Trả lời ngắn gọn.")

    def nfd(text: str) -> str:
        return unicodedata.normalize("NFD", text)

    question, answer, context = "Học sâu là gì?", "Một nhánh của học máy.", "Ngữ cảnh: mạng nơ-ron."
    assert tok(nfd(question))["input_ids"] != tok(question)["input_ids"]  # the tokenizer alone does see a difference
    assert template.prompt_ids(tok, nfd(question), nfd(context)) == template.prompt_ids(tok, question, context)
    assert template.answer_ids(tok, nfd(answer)) == template.answer_ids(tok, answer)
    turns = conversation(question, answer, "Còn LoRA?")
    assert template.conversation_ids(tok, [{**m, "content": nfd(m["content"])} for m in turns]) == \
        template.conversation_ids(tok, turns)
    decomposed_system = PromptTemplate.for_tokenizer(tok, kind, system_prompt=nfd("Trả lời ngắn gọn."))
    assert decomposed_system.prompt_ids(tok, question) == template.prompt_ids(tok, question)

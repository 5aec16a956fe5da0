"""The chat template a GGUF file carries: the model's own (with lmtune's system prompt as the default), or one
that renders exactly lmtune's plain training prompt, so llama.cpp, Ollama and LM Studio prompt as training did."""

from __future__ import annotations

import json

from ..data.template import PromptTemplate
from .vocab import adds_bos


def _jinja_literal(text: str) -> str:
    # JSON string syntax is a valid Jinja string literal (\n, \", \\ escapes), in Python's jinja2 and llama.cpp's.
    return json.dumps(text, ensure_ascii=False)


def gguf_chat_template(template: PromptTemplate, tokenizer) -> str:
    """The Jinja chat template to store in the file: the model's own for chat-template models (with lmtune's
    system prompt as the default system message), or `plain_chat_template` for lmtune's plain template."""
    if template.kind == "chat":
        chat = template.chat_template or tokenizer.chat_template
        if not template.system_prompt:
            return chat
        default = _jinja_literal(template.system_prompt)
        return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
                f"{{%- set messages = [{{'role': 'system', 'content': {default}}}] + messages -%}}"
                "{%- endif -%}" + chat)
    return plain_chat_template(template, adds_bos(tokenizer))


def plain_chat_template(template: PromptTemplate, add_bos: bool) -> str:
    """A Jinja chat template that renders exactly what lmtune trains on and prompts with (conversation_ids):

        [system prompt + "\\n"] "Human: " question "\\nAssistant:" " " answer EOS "Human: " question2 ...

    The system prompt (a system message, else the template's own) goes before the first question only; each
    answer ends with EOS. A runtime adds BOS at the very start itself when the vocabulary asks for it, so the
    template writes BOS only before later turns (where lmtune's tokenizer adds one to every turn).
    The prompt already ends with "Assistant:" after every user message: that is the generation prompt.
    """
    before, _, after = template.prompt.partition("{question}")
    bos = "{{- bos_token -}}" if add_bos else ""
    return (
        f"{{%- set ns = namespace(system={_jinja_literal(template.system_prompt)}, turn=0) -%}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}"
        "{%- elif message['role'] == 'user' -%}"
        f"{{%- if ns.turn > 0 -%}}{bos}{{%- elif ns.system -%}}{{{{- ns.system + \"\\n\" -}}}}{{%- endif -%}}"
        f"{{{{- {_jinja_literal(before)} + message['content'] + {_jinja_literal(after)} -}}}}"
        "{%- set ns.turn = ns.turn + 1 -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{- {_jinja_literal(template.answer_prefix)} + message['content'] + eos_token -}}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )

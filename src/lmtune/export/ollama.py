"""An Ollama Modelfile beside the GGUF: the training prompt as a Go TEMPLATE, stop tokens, system prompt,
generation defaults.

Ollama renders prompts with Go's text/template, not with the Jinja template in the file, and a model
whose TEMPLATE or stop tokens are missing rambles: the most reported failure of fine-tuned models in
Ollama. The TEMPLATE is derived from the Jinja chat template lmtune wrote into the GGUF by rendering it
with marker strings and cutting the result into the pieces around each message; the pieces are then put
back together in Python for several conversations, exactly as the Go template would, and must give the
Jinja rendering again, or no Modelfile is written.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import GenerateConfig
from ..errors import LmtuneError

_SYSTEM, _USER1, _ANSWER1, _USER2 = "LMTUNESYSTEMMARK", "LMTUNEUSERONEMARK", "LMTUNEANSWERONEMARK", "LMTUNEUSERTWOMARK"


class ModelfileError(LmtuneError):
    """The chat template cannot be written as an Ollama TEMPLATE."""


@dataclass
class TemplatePieces:
    """A chat as Ollama's TEMPLATE builds it:

    (system_prefix + system + system_suffix, or default_system when there is none)
    first_user_prefix + question + user_suffix, then for each answer: answer_prefix + answer,
    later_user_prefix + question + user_suffix ..., and generation_prompt at the end.
    """

    system_prefix: str
    system_suffix: str
    default_system: str
    first_user_prefix: str
    later_user_prefix: str
    user_suffix: str
    answer_prefix: str
    generation_prompt: str

    def render(self, system: str, turns: list[tuple[str, str | None]]) -> str:
        """What the Go template renders: the same structure in Python (used to check the pieces)."""
        text = f"{self.system_prefix}{system}{self.system_suffix}" if system else self.default_system
        for number, (question, answer) in enumerate(turns):
            text += (self.later_user_prefix if number else self.first_user_prefix) + question + self.user_suffix
            if answer is not None:
                text += self.answer_prefix + answer
        return text + self.generation_prompt


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def _cut(text: str, *marks: str) -> list[str]:
    """text split around each mark, in order: [before mark1, between mark1 and mark2, ..., after the last]."""
    pieces = []
    for mark in marks:
        before, found, text = text.partition(mark)
        if not found:
            raise ModelfileError(f"the chat template drops or changes message text ({mark} missing from its output); "
                                 "it cannot be written as an Ollama TEMPLATE: export without --ollama")
        pieces.append(before)
    return pieces + [text]


def template_pieces(render) -> TemplatePieces:
    """Pieces of the chat template `render(messages, add_generation_prompt) -> text`, checked on three
    conversations (one and two turns, with and without a system message)."""
    def msg(role, content):
        return {"role": role, "content": content}

    one = render([msg("user", _USER1)], True)
    one_no_generation = render([msg("user", _USER1)], False)
    with_system = render([msg("system", _SYSTEM), msg("user", _USER1)], True)
    two = render([msg("system", _SYSTEM), msg("user", _USER1), msg("assistant", _ANSWER1), msg("user", _USER2)], True)

    default_and_prefix, user_suffix_no_generation = _cut(one_no_generation, _USER1)
    _, after_user = _cut(one, _USER1)
    if not after_user.startswith(user_suffix_no_generation):
        raise ModelfileError("the chat template changes earlier turns when asked for a generation prompt; "
                             "it cannot be written as an Ollama TEMPLATE: export without --ollama")
    user_suffix, generation = user_suffix_no_generation, after_user[len(user_suffix_no_generation):]
    system_prefix, system_and_prefix, _ = _cut(with_system, _SYSTEM, _USER1)
    # Where the system suffix ends and the user prefix begins is ambiguous and does not matter (they are always
    # written together); the user prefix is taken as what the with- and without-system renderings share.
    first_user_prefix = _common_suffix(system_and_prefix, default_and_prefix)
    _, _, between, later_prefix, _ = _cut(two, _SYSTEM, _USER1, _ANSWER1, _USER2)
    if not between.startswith(user_suffix):
        raise ModelfileError("the chat template ends a question differently before an answer than before the "
                             "generation prompt; it cannot be written as an Ollama TEMPLATE: export without --ollama")
    pieces = TemplatePieces(
        system_prefix=system_prefix, system_suffix=system_and_prefix[: len(system_and_prefix) - len(first_user_prefix)],
        default_system=default_and_prefix[: len(default_and_prefix) - len(first_user_prefix)],
        first_user_prefix=first_user_prefix, later_user_prefix=later_prefix, user_suffix=user_suffix,
        answer_prefix=between[len(user_suffix):], generation_prompt=generation)
    for system, turns in [("", [("Câu hỏi?", None)]), ("Bạn là trợ lý.", [("Một?", "Hai."), ("Ba?", None)]),
                          ("", [("A?", "B."), ("C?", "D."), ("E?", None)])]:
        messages = ([msg("system", system)] if system else [])
        for question, answer in turns:
            messages += [msg("user", question)] + ([msg("assistant", answer)] if answer is not None else [])
        if pieces.render(system, turns) != render(messages, True):
            raise ModelfileError("the chat template does not follow a fixed per-message pattern (it depends on "
                                 "more than role and position), so it cannot be written as an Ollama TEMPLATE: "
                                 "export without --ollama")
    return pieces


def _go_literal(text: str) -> str:
    # Literal text inside the TEMPLATE's triple quotes: only the template delimiters and the closing quotes matter.
    if "{{" in text or '"""' in text:
        raise ModelfileError(f"the prompt template contains {{{{ or \"\"\" ({text!r}), which an Ollama TEMPLATE cannot hold")
    return text


def go_template(p: TemplatePieces) -> str:
    """The TEMPLATE text, in Go's text/template syntax as Ollama runs it: `.System` is the system prompt
    (the request's, else the Modelfile's SYSTEM), `.Messages` the conversation (system messages in it are
    skipped: they arrive as `.System`). No `{{-`/`-}}` trim markers: they would eat the spaces and newlines
    the prompt is made of ("Human: ", "\nAssistant:")."""
    lit = _go_literal
    system = f"{{{{ if .System }}}}{lit(p.system_prefix)}{{{{ .System }}}}{lit(p.system_suffix)}"
    system += f"{{{{ else }}}}{lit(p.default_system)}{{{{ end }}}}" if p.default_system else "{{ end }}"
    if p.first_user_prefix == p.later_user_prefix:
        user = f"{lit(p.first_user_prefix)}{{{{ .Content }}}}{lit(p.user_suffix)}"
        start = ""
    else:
        # Later questions start differently (after the previous answer's end-of-turn, or with a BOS): a variable
        # remembers whether a question was written already.
        user = (f"{{{{ if $later }}}}{lit(p.later_user_prefix)}{{{{ else }}}}{lit(p.first_user_prefix)}{{{{ end }}}}"
                f"{{{{ .Content }}}}{lit(p.user_suffix)}{{{{ $later = true }}}}")
        start = "{{ $later := false }}"
    return (f"{start}{system}{{{{ range .Messages }}}}"
            f"{{{{ if eq .Role \"user\" }}}}{user}"
            f"{{{{ else if eq .Role \"assistant\" }}}}{lit(p.answer_prefix)}{{{{ .Content }}}}"
            f"{{{{ end }}}}{{{{ end }}}}{lit(p.generation_prompt)}")


def _quote(text: str) -> str:
    if '"""' in text:
        raise ModelfileError(f'the system prompt contains """, which a Modelfile cannot hold: {text[:60]!r}')
    return f'"""{text}"""'


def _stop_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_name: str, template: str, system: str, stops: list[str], generate: GenerateConfig) -> str:
    lines = ["# Written by lmtune export. Create the model with:  ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}", f"TEMPLATE {_quote(template)}"]
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    lines += [f"PARAMETER stop {_stop_literal(stop)}" for stop in stops]
    # lmtune's generation defaults (the training config's generate section), under Ollama's parameter names.
    temperature = 0.0 if generate.greedy else generate.temperature
    lines += [f"PARAMETER temperature {temperature:g}", f"PARAMETER top_p {generate.top_p:g}",
              f"PARAMETER top_k {generate.top_k}", f"PARAMETER repeat_penalty {generate.repetition_penalty:g}",
              f"PARAMETER num_predict {generate.max_new_tokens}"]
    return "\n".join(lines) + "\n"


def stop_strings(tokenizer, pieces: TemplatePieces, extra_eos_ids: list[int], next_turn: str = "") -> list[str]:
    """Every text that ends an answer: the EOS token (and any other EOS id the generation config names), the
    special tokens the template writes after an answer (those in the later turns' prefix but not the first's,
    e.g. "<|im_end|>"), and `next_turn`, the start of a question (e.g. "Human:"), in case the model writes
    the next question itself."""
    stops = [tokenizer.convert_ids_to_tokens(token_id) for token_id in [tokenizer.eos_token_id, *extra_eos_ids]
             if token_id is not None]
    specials = {str(t) for t in tokenizer.added_tokens_decoder.values() if t.special}
    stops += sorted(t for t in specials if t in pieces.later_user_prefix and t not in pieces.first_user_prefix)
    stops.append(next_turn.strip())
    return list(dict.fromkeys(s for s in stops if s))

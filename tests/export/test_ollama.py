"""The Ollama Modelfile: parsed, its TEMPLATE rendered by a small Go text/template renderer (below) for
conversations gives exactly the prompt lmtune builds; every end-of-turn token is a stop; SYSTEM and the
generation defaults are there. Ollama itself is not installed here, so its Go renderer is stood in for by
`render_go`, which implements the part of Go's text/template the TEMPLATE uses, with Go's semantics
(trim markers, if/else if/else, range, eq, variables declared with := and assigned with =)."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from conftest import make_llama_tokenizer, make_tiny_llama, run

from lmtune.data.template import PromptTemplate
from lmtune.export.exporter import export_gguf
from lmtune.export.ollama import ModelfileError, template_pieces
from lmtune.export.verify import runtime_ids

QUIET = {"log": lambda _: None}

# ---------------------------------------------------------------- a small Go text/template renderer

_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def _lex(template: str) -> list[tuple[str, str]]:
    items, position = [], 0
    for match in _ACTION.finditer(template):
        text = template[position:match.start()]
        if match.group(1) == "-":  # "{{-" trims the white space before it
            text = text.rstrip()
        items.append(("text", text))
        items.append(("action", match.group(2)))
        position = match.end()
        if match.group(3) == "-":  # "-}}" trims the white space after it
            rest = template[position:]
            position += len(rest) - len(rest.lstrip())
    items.append(("text", template[position:]))
    return items


def _parse(items, index=0, stop=("end",)):
    """-> (nodes, index of the closing action, its keyword)."""
    nodes = []
    while index < len(items):
        kind, value = items[index]
        if kind == "text":
            nodes.append(("text", value))
            index += 1
            continue
        keyword = value.split()[0] if value else ""
        if keyword in stop or (keyword == "else" and "else" in stop):
            return nodes, index, value
        if keyword == "if":
            branches, condition = [], value[3:]
            while True:
                body, index, closing = _parse(items, index + 1, stop=("end", "else"))
                branches.append((condition, body))
                if closing == "end":
                    break
                condition = closing[len("else if "):] if closing.startswith("else if ") else "true"
            nodes.append(("if", branches))
        elif keyword == "range":
            body, index, _ = _parse(items, index + 1, stop=("end",))
            nodes.append(("range", value[len("range "):], body))
        else:
            nodes.append(("action", value))
        index += 1
    return nodes, index, None


def _words(expression: str) -> list[str]:
    return re.findall(r'"(?:[^"\\]|\\.)*"|\S+', expression)


def _value(word: str, dot, root, variables):
    if word.startswith('"'):
        return word[1:-1].encode().decode("unicode_escape")
    if word in ("true", "false"):
        return word == "true"
    if word.startswith("$."):
        return root[word[2:]]
    if word.startswith("$"):
        return variables[word]
    if word.startswith("."):
        return dot[word[1:]]
    raise ValueError(f"unsupported word {word!r}")


def _evaluate(expression: str, dot, root, variables):
    words = _words(expression)
    if words[0] == "eq":
        return _value(words[1], dot, root, variables) == _value(words[2], dot, root, variables)
    if words[0] == "not":
        return not _evaluate(" ".join(words[1:]), dot, root, variables)
    assert len(words) == 1, expression
    return _value(words[0], dot, root, variables)


def _execute(nodes, dot, root, variables, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "if":
            for condition, body in node[1]:
                if _evaluate(condition, dot, root, variables):  # Go: empty string, false, empty list are false
                    _execute(body, dot, root, variables, out)
                    break
        elif node[0] == "range":
            for element in _evaluate(node[1], dot, root, variables):
                _execute(node[2], element, root, variables, out)
        else:
            declared = re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.+)", node[1])
            if declared:  # Go 1.11+: `=` assigns a variable declared outside the range
                variables[declared.group(1)] = _evaluate(declared.group(3), dot, root, variables)
            else:
                value = _evaluate(node[1], dot, root, variables)
                out.append("" if value is None else str(value))


def render_go(template: str, data: dict) -> str:
    nodes, _, _ = _parse(_lex(template))
    out: list[str] = []
    _execute(nodes, data, data, {}, out)
    return "".join(out)


def test_the_renderer_follows_go_semantics():
    assert render_go("a  {{- .X -}}  b", {"X": 1}) == "a1b"
    assert render_go('{{ $n := false }}{{ range .L }}{{ if $n }},{{ end }}{{ .V }}{{ $n = true }}{{ end }}',
                     {"L": [{"V": 1}, {"V": 2}, {"V": 3}]}) == "1,2,3"
    assert render_go('{{ if eq .R "a" }}A{{ else if eq .R "b" }}B{{ else }}C{{ end }}', {"R": "b"}) == "B"
    assert render_go("{{ if .S }}yes{{ else }}no{{ end }}", {"S": ""}) == "no"


# ---------------------------------------------------------------- the Modelfile


def parse_modelfile(text: str) -> dict:
    """FROM, TEMPLATE, SYSTEM (triple-quoted values may span lines) and PARAMETER lines."""
    result: dict = {"PARAMETER": []}
    for match in re.finditer(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER)[ \t]+("""(.*?)"""|[^\n]*)$', text, re.M | re.S):
        command, value = match.group(1), match.group(3) if match.group(3) is not None else match.group(2)
        if command == "PARAMETER":
            name, _, argument = value.partition(" ")
            if argument.startswith('"'):
                argument = argument[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            result["PARAMETER"].append((name, argument))
        else:
            result[command] = value
    return result


def ollama_prompt_ids(modelfile: dict, tokenizer, messages: list[dict], add_bos: bool) -> list[int]:
    """What Ollama feeds the model: .System is the conversation's system message, else the Modelfile's SYSTEM;
    .Messages holds the conversation (its system message too); the text is tokenized with specials parsed."""
    system = next((m["content"] for m in messages if m["role"] == "system"), modelfile.get("SYSTEM", ""))
    text = render_go(modelfile["TEMPLATE"], {"System": system, "Messages": [
        {"Role": m["role"], "Content": m["content"]} for m in messages]})
    return runtime_ids(tokenizer, text, add_bos)


TWO_TURNS = [{"role": "user", "content": "Học máy là gì?"}, {"role": "assistant", "content": "Một nhánh của AI."},
             {"role": "user", "content": "Còn học sâu thì sao?"}]


@pytest.fixture(scope="module")
def plain_model_with_system(tmp_path_factory, tiny_bloom_dir) -> str:
    """The tiny BLOOM as lmtune's training leaves it: the plain template with a system prompt, saved beside it."""
    folder = tmp_path_factory.mktemp("m") / "bloom-system"
    shutil.copytree(tiny_bloom_dir, folder)
    PromptTemplate(kind="plain", system_prompt="Bạn là trợ lý AI. Trả lời ngắn gọn.").save(folder)
    return str(folder)


def test_plain_template_modelfile_renders_the_training_prompt(plain_model_with_system, tmp_path, capsys):
    from transformers import AutoTokenizer

    code, out, err = run(capsys, "export", "--model", plain_model_with_system, "--output", tmp_path / "tuned.gguf",
                         "--ollama", "--name", "Tuned Bloom")
    assert code == 0, err
    assert "ollama create tuned-bloom -f Modelfile" in out
    modelfile = parse_modelfile((tmp_path / "Modelfile").read_text(encoding="utf-8"))
    assert modelfile["FROM"] == "./tuned.gguf"
    assert modelfile["SYSTEM"] == "Bạn là trợ lý AI. Trả lời ngắn gọn."
    parameters = dict(modelfile["PARAMETER"])
    stops = [v for k, v in modelfile["PARAMETER"] if k == "stop"]
    assert "</s>" in stops and "Human:" in stops
    assert float(parameters["temperature"]) == 0.7 and int(parameters["num_predict"]) == 128

    tokenizer = AutoTokenizer.from_pretrained(plain_model_with_system)
    template = PromptTemplate.load(plain_model_with_system)
    for messages in (TWO_TURNS[:1], TWO_TURNS, [{"role": "system", "content": "Nói tiếng Anh."}] + TWO_TURNS):
        expected = template.conversation_ids(tokenizer, messages)
        assert ollama_prompt_ids(modelfile, tokenizer, messages, add_bos=False) == expected
    one = ollama_prompt_ids(modelfile, tokenizer, TWO_TURNS[:1], add_bos=False)
    assert tokenizer.decode(one) == "Bạn là trợ lý AI. Trả lời ngắn gọn.\nHuman: Học máy là gì?\nAssistant:"


@pytest.fixture(scope="module")
def chatml_model_dir(tmp_path_factory) -> str:
    """A model with its own chat template (ChatML with a default system message, as SmolLM2 and Qwen2 have)."""
    tokenizer = make_llama_tokenizer(pad_is_eos=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    model = make_tiny_llama(tokenizer)
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("m") / "chatml"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_chat_template_modelfile_renders_the_models_own_template(chatml_model_dir, tmp_path):
    from transformers import AutoTokenizer

    result = export_gguf(str(tmp_path / "chat.gguf"), model=chatml_model_dir, quant="f16", ollama=True, **QUIET)
    assert result.modelfile == str(tmp_path / "Modelfile")
    modelfile = parse_modelfile((tmp_path / "Modelfile").read_text(encoding="utf-8"))
    assert "SYSTEM" not in modelfile  # the template's own default system message is in the TEMPLATE
    # the tokenizer's EOS (the end of an answer in the chat template) and the model config's own EOS id (2)
    assert [v for k, v in modelfile["PARAMETER"] if k == "stop"] == ["<|im_end|>", "</s>"]
    tokenizer = AutoTokenizer.from_pretrained(chatml_model_dir)
    template = PromptTemplate.for_tokenizer(tokenizer)
    for messages in (TWO_TURNS[:1], TWO_TURNS, [{"role": "system", "content": "Be brief."}] + TWO_TURNS):
        assert ollama_prompt_ids(modelfile, tokenizer, messages, add_bos=False) == template.conversation_ids(tokenizer, messages)


def test_a_template_that_depends_on_more_than_role_and_position_is_refused():
    def render(messages, generation):  # numbers the questions: no fixed text around a message can do that
        text = "".join(f"Q{i}: {m['content']}\n" if m["role"] == "user" else f"A: {m['content']}\n"
                       for i, m in enumerate(messages) if m["role"] != "system")
        return text + ("A:" if generation else "")

    with pytest.raises(ModelfileError, match="export without --ollama"):
        template_pieces(render)


def test_existing_modelfile_is_refused_without_overwrite(tiny_bloom_dir, tmp_path, capsys):
    (tmp_path / "Modelfile").write_text("FROM ./other.gguf\n")
    code, _, err = run(capsys, "export", "--model", tiny_bloom_dir, "--output", tmp_path / "m.gguf", "--format", "ollama")
    assert code == 2 and "Modelfile already exists" in err
    assert (tmp_path / "Modelfile").read_text() == "FROM ./other.gguf\n" and not (tmp_path / "m.gguf").exists()

"""`lmtune chat`: streaming, history, context limits, Ctrl-C; and the chat/serve commands' flag handling."""

from __future__ import annotations

import pytest
from conftest import conversation

from lmtune import cli
from lmtune.config import GenerateConfig
from lmtune.inference.chat import answer_reserve, chat_loop
from lmtune.inference.generate import generate
from lmtune.inference.load import load_for_inference

GREEDY = GenerateConfig(greedy=True, max_new_tokens=8, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_for_inference(tiny_llama_dir)


class Terminal:
    """Fake input (a script of lines; an exception instance is raised instead) and recorded output."""

    def __init__(self, *lines):
        self.lines = list(lines)
        self.prompts = 0
        self.written: list[str] = []

    def read(self, prompt: str) -> str:
        self.prompts += 1
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if isinstance(line, BaseException):
            raise line
        return line

    def write(self, text: str) -> None:
        self.written.append(text)

    @property
    def text(self) -> str:
        return "".join(self.written)


def test_chat_streams_the_greedy_answer_and_remembers_the_turn(loaded):
    terminal = Terminal("Học máy là gì?")
    history = chat_loop(loaded, GREEDY, terminal.read, terminal.write)
    expected = generate(loaded, "Học máy là gì?", GREEDY).text
    assert history == [("Học máy là gì?", expected)]
    assert expected in terminal.text
    assert sum(1 for piece in terminal.written if piece and piece in expected) > 1  # several pieces: streamed
    assert terminal.prompts == 2  # asked again after the answer, then Ctrl-D (EOFError) ended it


def test_second_turn_prompt_holds_the_first(loaded, monkeypatch):
    import lmtune.inference.chat as chat

    prompts = []
    real_run_batch = chat.run_batch
    monkeypatch.setattr(chat, "run_batch", lambda model, rows: (prompts.append(rows[0].prompt_ids), real_run_batch(model, rows)))
    terminal = Terminal("Học máy là gì?", "LoRA là gì?")
    history = chat_loop(loaded, GREEDY, terminal.read, terminal.write)
    assert [q for q, _ in history] == ["Học máy là gì?", "LoRA là gì?"]
    assert prompts[1] == loaded.template.conversation_ids(
        loaded.tokenizer, conversation("Học máy là gì?", history[0][1], "LoRA là gì?"))


def test_reset_and_exit(loaded):
    terminal = Terminal("Học máy là gì?", "/reset", "LoRA là gì?", "/exit", "never read")
    history = chat_loop(loaded, GREEDY, terminal.read, terminal.write)
    assert [q for q, _ in history] == ["LoRA là gì?"]
    assert "[conversation forgotten]" in terminal.text
    assert terminal.lines == ["never read"]


def test_old_turns_are_dropped_with_a_notice_when_the_context_is_full(loaded):
    context = 64
    questions = ["Học máy là gì?", "LoRA là gì?", "Overfitting là gì?", "GPU dùng để làm gì?", "Dữ liệu là gì?"]
    terminal = Terminal(*questions)
    history = chat_loop(loaded, GREEDY, terminal.read, terminal.write, context=context)
    assert "[context full: forgot the" in terminal.text
    assert history[-1][0] == questions[-1] and len(history) < len(questions)
    messages = [m for q, a in history[:-1] for m in conversation(q, a)] + conversation(history[-1][0])
    assert len(loaded.template.conversation_ids(loaded.tokenizer, messages)) <= context - answer_reserve(GREEDY, context)


def test_a_question_longer_than_the_context_is_refused_not_crashed(loaded):
    terminal = Terminal("Học máy là gì? " * 50, "LoRA là gì?")
    history = chat_loop(loaded, GREEDY, terminal.read, terminal.write, context=64)
    assert "too long for this model's context" in terminal.text
    assert [q for q, _ in history] == ["LoRA là gì?"]


def test_a_too_long_message_is_refused_before_any_turn_is_forgotten(loaded):
    terminal = Terminal("Học máy là gì?", "LoRA là gì?", "Học máy là gì? " * 50, "/exit")
    history = chat_loop(loaded, GREEDY, terminal.read, terminal.write, context=64)
    assert "too long for this model's context" in terminal.text
    assert "[context full" not in terminal.text
    assert [q for q, _ in history] == ["Học máy là gì?", "LoRA là gì?"]  # nothing was sent, so nothing is lost


def test_a_mistyped_command_is_not_sent_to_the_model(loaded, monkeypatch):
    import lmtune.inference.chat as chat

    sent = []
    real_run_batch = chat.run_batch
    monkeypatch.setattr(chat, "run_batch", lambda model, rows: (sent.append(rows[0].prompt_ids), real_run_batch(model, rows)))
    terminal = Terminal("/exi", "/etc/hosts là gì?", "/exit", "never read")
    history = chat_loop(loaded, GREEDY, terminal.read, terminal.write)
    assert "unknown command /exi: did you mean /exit?" in terminal.text and "/reset" in terminal.text
    assert [q for q, _ in history] == ["/etc/hosts là gì?"]  # a question that starts with a path is a question
    assert len(sent) == 1 and terminal.lines == ["never read"]


def test_ctrl_c_stops_the_answer_not_the_chat(loaded):
    terminal = Terminal(KeyboardInterrupt(), "Học máy là gì?", "LoRA là gì?")
    interrupted = []
    write = terminal.write

    def write_then_interrupt(text: str) -> None:
        write(text)
        if not interrupted and terminal.prompts == 2 and text.strip() and not text.startswith(("[", "\n", "Commands")):
            interrupted.append(text)
            raise KeyboardInterrupt  # as Ctrl-C does, in the middle of generating

    history = chat_loop(loaded, GREEDY, terminal.read, write_then_interrupt)
    assert interrupted and "[stopped]" in terminal.text
    assert "Commands:" in terminal.text  # Ctrl-C at the prompt shows how to leave instead of leaving
    assert [q for q, _ in history] == ["Học máy là gì?", "LoRA là gì?"]
    assert history[0][1] == interrupted[0].strip()  # only what was shown is remembered
    assert history[1][1]  # and the next question is answered in full


def test_lmtune_chat_command(tiny_llama_dir, monkeypatch, capsys):
    lines = iter(["Học máy là gì?"])

    def fake_input(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert cli.main(["chat", "--model", tiny_llama_dir, "--greedy", "--max-new-tokens", "8", "--repetition-penalty", "1.0"]) == 0
    loaded = load_for_inference(tiny_llama_dir)
    assert generate(loaded, "Học máy là gì?", GREEDY).text in capsys.readouterr().out


def test_lmtune_serve_refuses_bad_flags_before_loading(capsys):
    assert cli.main(["serve", "--model", "/nonexistent/model", "--port", "70000", "--max-batch-size", "0"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "--port must be 0..65535" in err and "--max-batch-size must be at least 1" in err


def test_lmtune_serve_reports_a_taken_port(tiny_llama_dir, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--model", tiny_llama_dir, "--port", str(port)]) == cli.EXIT_USER_ERROR
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err

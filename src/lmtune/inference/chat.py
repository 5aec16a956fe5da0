"""Talk to a model in the terminal: answers stream as they are generated, the conversation is remembered.

The loop takes `read` and `write` callables (the terminal's `input` and stdout in `lmtune chat`,
fakes in tests). Multi-turn prompts come from `PromptTemplate.conversation_ids`, the template the
model was trained with. When the conversation no longer fits in the model's context next to a
full answer, the oldest turns are dropped, with a notice.
"""

from __future__ import annotations

import difflib
import sys
from typing import Callable

from ..config import GenerateConfig
from .batching import Row, context_length, run_batch
from .load import LoadedModel

HELP = "Commands: /reset forgets the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer."

Turn = tuple[str, str]  # (question, answer)


def fit_conversation(loaded: LoadedModel, history: list[Turn], question: str, budget: int) -> tuple[list[int] | None, int]:
    """Prompt ids of history + question within `budget` tokens, dropping the oldest turns from `history`.

    Returns (ids or None if the question alone does not fit, number of turns dropped). A question that cannot
    fit even without history is refused before anything is dropped: nothing would be sent, so nothing is lost.
    """
    alone = loaded.template.conversation_ids(loaded.tokenizer, [{"role": "user", "content": question}])
    if len(alone) > budget:
        return None, 0
    dropped = 0
    while True:
        messages = []
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        ids = loaded.template.conversation_ids(loaded.tokenizer, messages + [{"role": "user", "content": question}])
        if len(ids) <= budget:
            return ids, dropped
        if not history:
            return None, dropped
        history.pop(0)
        dropped += 1


COMMANDS = ("/reset", "/exit", "/help")


def _looks_like_command(line: str) -> bool:
    # One word after a slash: a question that starts with a path ("/etc/hosts là gì?") has spaces and is sent.
    return line.startswith("/") and len(line.split()) == 1


def unknown_command(line: str) -> str:
    close = difflib.get_close_matches(line, COMMANDS, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown command {line}: {hint}commands are {', '.join(COMMANDS)} (nothing was sent to the model)"


def answer_reserve(cfg: GenerateConfig, context: int) -> int:
    # Room kept free for the answer; on a short-context model a full max_new_tokens would leave no room for history.
    return max(1, min(cfg.max_new_tokens, context // 2))


def chat_loop(loaded: LoadedModel, cfg: GenerateConfig, read: Callable[[str], str], write: Callable[[str], None],
              context: int | None = None) -> list[Turn]:
    """Run the chat until /exit or end of input (EOFError from `read`); returns the remembered turns."""
    context = context or context_length(loaded)
    reserve = answer_reserve(cfg, context)
    history: list[Turn] = []
    write(f"{HELP}\n")
    while True:
        try:
            line = read("> ")
        except EOFError:  # Ctrl-D
            write("\n")
            return history
        except KeyboardInterrupt:  # Ctrl-C at the prompt: nothing to stop, so say how to leave
            write(f"\n{HELP}\n")
            continue
        question = line.strip()
        if not question:
            continue
        if question == "/exit":
            return history
        if question == "/reset":
            history.clear()
            write("[conversation forgotten]\n")
            continue
        if question in ("/help", "/?"):
            write(f"{HELP}\n")
            continue
        if _looks_like_command(question):  # a mistyped /exit must not become a question to the model
            write(f"[{unknown_command(question)}]\n")
            continue
        ids, dropped = fit_conversation(loaded, history, question, context - reserve)
        if dropped:
            write(f"[context full: forgot the {dropped} oldest turn{'s' if dropped > 1 else ''}]\n")
        if ids is None:
            write(f"[the message is too long for this model's context of {context} tokens; shorten it]\n")
            continue
        history.append((question, answer_once(loaded, cfg, ids, context - len(ids), write)))


def answer_row(cfg: GenerateConfig, ids: list[int], room: int, on_text: Callable[[str], None]) -> Row:
    """The decoding row of one chat answer to the prompt `ids`: `cfg`'s sampling, at most `room` new tokens, the
    text streamed to `on_text`. Run it with `run_batch`; setting `row.cancelled` stops it after the current token
    (the web UI does, when its page goes away)."""
    return Row(ids, min(cfg.max_new_tokens, room), emit=lambda text, _: on_text(text) if text else None,
               temperature=0.0 if cfg.greedy else cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
               repetition_penalty=cfg.repetition_penalty, strip=True)


def answer_once(loaded: LoadedModel, cfg: GenerateConfig, ids: list[int], room: int, write: Callable[[str], None]) -> str:
    """Stream one answer to `write`; Ctrl-C (KeyboardInterrupt) stops it and keeps what was shown."""
    row = answer_row(cfg, ids, room, write)
    try:
        run_batch(loaded, [row])
    except KeyboardInterrupt:
        write("\n[stopped]\n")
        return row.text[: row.sent]
    write("\n")
    if row.finish_reason == "length":
        write(f"[answer cut at {row.max_tokens} tokens]\n")
    return row.text


def run_chat(loaded: LoadedModel, cfg: GenerateConfig) -> None:
    """The terminal chat of `lmtune chat`."""
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    chat_loop(loaded, cfg, input, write)

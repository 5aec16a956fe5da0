"""Generate many sequences together: one decode loop (lmtune/decoding.py) per batch, each row with its own settings.

`generate` and `generate_batch` run `run_batch` directly, `chat` with one row; `serve` feeds rows from many
HTTP requests to a `BatchWorker` thread, which takes whatever rows are waiting (up to a batch size) and runs
them as one left-padded batch, so throughput grows with load.

Each row picks its own next token (`_choose`: its temperature, top_p, top_k and repetition penalty, with
its own torch.Generator, so a seed gives the same answer whatever else is in the batch; the penalty counts
only the row's own tokens, never other rows' left padding, which for a tokenizer whose pad id is its EOS id
would make a batched answer differ from the same request alone); `_advance`, called after every step,
records tokens, finds EOS, stop strings and length limits, streams text, and stops rows whose client has gone.
"""

from __future__ import annotations

import queue
import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..decoding import decode
from .load import LoadedModel, inference_autocast, padding_id, stop_token_ids

# (text to append, finish reason or None). Finish reasons follow OpenAI: "stop" (EOS or a stop
# string), "length" (max_tokens reached), "cancelled" (client left or Ctrl-C), "error".
Emit = Callable[[str, "str | None"], None]


@dataclass
class Row:
    """One sequence to generate and its state while generating."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Emit
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # Chat answers are shown stripped, as PromptTemplate.clean_answer does; raw completions are not.
    strip: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)

    ids: list[int] = field(default_factory=list)
    text: str = ""  # the answer so far, cut at a stop string
    sent: int = 0  # characters of `text` already emitted
    finish_reason: str | None = None
    generator: torch.Generator | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def context_length(loaded: LoadedModel) -> int:
    """How many tokens (prompt + answer) the model can attend to (with llama.cpp answering: the slots it holds)."""
    if loaded.llama_cpp is not None:
        return loaded.llama_cpp.n_ctx
    config = getattr(loaded.model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    # BLOOM (ALiBi) has no position limit in its config; its tokenizer records the training length.
    value = getattr(loaded.tokenizer, "model_max_length", 0)
    return value if 0 < value < 1_000_000 else 2048


# ---------------------------------------------------------------- per-row token choice


def _choose(row: Row, logits: torch.Tensor) -> int:
    if row.repetition_penalty != 1.0:
        # Only the row's own tokens count: never the left padding of other rows' prompts.
        seen = torch.tensor(sorted(set(row.prompt_ids + row.ids)), device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values < 0, values * row.repetition_penalty, values / row.repetition_penalty)
    if row.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / row.temperature
    if row.top_k > 0 and row.top_k < logits.numel():
        cutoff = torch.topk(logits, row.top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if row.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one).
        drop = torch.cumsum(sorted_probs, 0) - sorted_probs >= row.top_p
        probs[order[drop]] = 0.0
    return int(torch.multinomial(probs.cpu(), 1, generator=row.generator))


# ---------------------------------------------------------------- per-row bookkeeping after each step


def _advance(row: Row, token: int, eos_ids: set[int], tokenizer) -> None:
    if row.cancelled.is_set():
        _finish(row, "cancelled")
        return
    if token in eos_ids:
        _finish(row, "stop")
        return
    row.ids.append(token)
    row.text = tokenizer.decode(row.ids, skip_special_tokens=True)
    if row.strip:
        row.text = row.text.lstrip()
    hit = _first_stop(row.text, row.stop)
    if hit is not None:
        row.text = row.text[:hit]
        _finish(row, "stop")
    elif len(row.ids) >= row.max_tokens:
        _finish(row, "length")
    else:
        _send(row, _safe_end(row))


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


def _safe_end(row: Row) -> int:
    """How much of the text can be shown now without showing something we may take back."""
    end = len(row.text)
    # A multi-byte character split across tokens decodes as U+FFFD until its last byte arrives.
    while end > row.sent and row.text[end - 1] == "\ufffd":
        end -= 1
    # Text that may be the start of a stop string is held until we know.
    for stop in row.stop:
        for n in range(min(len(stop) - 1, end - row.sent), 0, -1):
            if row.text[end - n : end] == stop[:n]:
                end -= n
                break
    if row.strip:  # trailing spaces are shown only once more text follows them
        end = row.sent + len(row.text[row.sent : end].rstrip())
    return max(end, row.sent)


def _send(row: Row, end: int, finish_reason: str | None = None) -> None:
    piece = row.text[row.sent : end]
    row.sent = end
    if piece or finish_reason:
        row.emit(piece, finish_reason)


def _finish(row: Row, reason: str) -> None:
    row.finish_reason = reason
    # A character whose bytes were split across tokens and cut by the token limit (or a stop, or EOS) will never
    # get its last bytes: the U+FFFD _safe_end held back is dropped, not shown, in the stream and in row.text.
    end = len(row.text)
    while end > row.sent and row.text[end - 1] == "\ufffd":
        end -= 1
    row.text = row.text[:end]
    if row.strip:
        row.text = row.text.rstrip()
    _send(row, len(row.text), reason)


# ---------------------------------------------------------------- one batch


def run_batch(loaded: LoadedModel, rows: list[Row]) -> None:
    """Generate all rows together (left padded); each row's `emit` gets its text as it grows."""
    for row in rows:
        if row.generator is None:
            row.generator = torch.Generator().manual_seed(row.seed if row.seed is not None else random.getrandbits(63))
    tokenizer, pad = loaded.tokenizer, padding_id(loaded.tokenizer)
    eos_ids = set(stop_token_ids(loaded))
    plain_greedy = all(r.temperature <= 0 and r.repetition_penalty == 1.0 for r in rows)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        if plain_greedy:  # one batched argmax instead of a Python loop over rows
            return logits.argmax(dim=-1)
        return torch.tensor([pad if row.done else _choose(row, logits[i]) for i, row in enumerate(rows)])

    def observe(tokens: list[int]) -> list[bool]:
        for row, token in zip(rows, tokens):
            if not row.done:
                _advance(row, token, eos_ids, tokenizer)
        return [row.done for row in rows]

    if loaded.llama_cpp is not None:  # llama.cpp chooses the tokens, one row after another (llamacpp_engine.py)
        for row in rows:
            if row.done:
                continue

            def step(token: int, row: Row = row) -> bool:
                _advance(row, token, eos_ids, tokenizer)
                return row.done

            loaded.llama_cpp.answer(row.prompt_ids, row.temperature, row.top_p, row.top_k, row.repetition_penalty,
                                    row.seed, step)
        return
    longest = max(r.max_tokens for r in rows)
    compiled = loaded.compiled_decoder
    if compiled is not None and len(rows) == 1 and compiled.fits(len(rows[0].prompt_ids), longest):
        # One answer at a time (chat, a lone serve request): the compiled step (compiled_decode.py). Batches stay
        # eager, where they measured faster.
        compiled.decode(rows[0].prompt_ids, longest, choose, observe)
        return
    with inference_autocast(loaded):
        decode(loaded.model, [r.prompt_ids for r in rows], pad, longest, choose, observe, loaded.device)


class BatchWorker:
    """A background thread that generates queued rows in batches of up to `max_batch_size`.

    Batching is static: rows that arrive while a batch runs wait for the next one. A cancelled row
    stops generating at the next step, so it no longer holds its batch open.
    """

    def __init__(self, loaded: LoadedModel, max_batch_size: int = 8, gather_seconds: float = 0.01):
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        # Requests sent "together" by clients reach us a few milliseconds apart; waiting this long
        # for company costs little next to one generation step.
        self.gather_seconds = gather_seconds
        self.queue: queue.Queue[Row | None] = queue.Queue()
        self.batch_sizes: list[int] = []  # one entry per batch run, for tests and /health
        self.cancelled_rows = 0
        self.busy_rows = 0
        self._thread = threading.Thread(target=self._loop, name="lmtune-batch-worker", daemon=True)

    def start(self) -> "BatchWorker":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=5)  # a running batch may still finish; the thread is a daemon

    def submit(self, row: Row) -> None:
        self.queue.put(row)

    def _gather(self, first: Row) -> list[Row] | None:
        batch = [first]
        deadline = time.monotonic() + self.gather_seconds
        while len(batch) < self.max_batch_size:
            try:
                row = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if row is None:
                self.queue.put(None)  # keep the stop signal for the loop
                break
            batch.append(row)
        return batch

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = []
            for row in self._gather(first):
                if row.cancelled.is_set():  # its client left while it waited
                    self.cancelled_rows += 1
                    _finish(row, "cancelled")
                else:
                    batch.append(row)
            if batch:
                self._run(batch)

    def _run(self, batch: list[Row]) -> None:
        self.batch_sizes.append(len(batch))
        self.busy_rows = len(batch)
        again: list[Row] = []
        try:
            run_batch(self.loaded, batch)
        except Exception:  # the server must keep serving; each waiting client gets an error, the log the traceback
            traceback.print_exc()
            for row in batch:
                if row.done:
                    continue
                if len(batch) > 1 and not row.ids:
                    # One row's failure must not cost the others their answers: a row that has produced nothing yet
                    # is generated again on its own, so that only a row that fails by itself gets the error.
                    again.append(row)
                    continue
                row.finish_reason = "error"
                row.emit("", "error")
        finally:
            retried = {id(r) for r in again}
            self.cancelled_rows += sum(r.finish_reason == "cancelled" for r in batch if id(r) not in retried)
            self.busy_rows = 0
        for row in again:
            row.generator = None  # seeded afresh by run_batch, as if it had never been in the failed batch
            self._run([row])

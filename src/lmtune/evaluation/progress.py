"""What evaluation shows while a model answers its questions (the slow part: greedy generation, batch by batch):

    answering: tuned model, reworded held-out questions 24/89 (31 s, 180 tokens/s, ETA 1 min 24 s)

On a terminal one line that updates after every batch; in a file or a pipe a plain line per batch (at most
PLAIN_LINES per question set, and one at least every PLAIN_SECONDS), as the training console does.
"""

from __future__ import annotations

import sys
import time

from ..config import GenerateConfig
from ..inference.generate import Answer, generate_batch
from ..inference.load import LoadedModel
from ..model import reclaim_cpu_threads
from ..training.console import PLAIN_LINES, PLAIN_SECONDS, _eta


class AnswerProgress:
    """`what` names the model and the questions ("tuned model, training questions"); `total` counts the questions."""

    def __init__(self, what: str, total: int, batch_size: int = 1, stream=None, enabled: bool = True):
        self.what, self.total = what, total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, -(-total // max(1, batch_size)) // PLAIN_LINES)  # batches between two plain lines
        self.done = self.tokens = self.batches = 0
        self.start = self.last_line = time.monotonic()
        self.bar = None
        if not enabled:
            return
        if self.terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, bar_format="{desc}", file=self.stream, dynamic_ncols=True, mininterval=0)
            self.bar.set_description_str(self.line())
        else:
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        text = f"answering: {self.what} {self.done}/{self.total}"
        if not self.done:
            return text
        seconds = time.monotonic() - self.start
        figures = [_eta(seconds)]
        if seconds > 0:
            figures.append(f"{self.tokens / seconds:,.0f} tokens/s")
        if self.done < self.total:
            figures.append(f"ETA {_eta(seconds / self.done * (self.total - self.done))}")
        return f"{text} ({', '.join(figures)})"

    def update(self, questions: int, new_tokens: int) -> None:
        """A batch is answered: `questions` more answers, `new_tokens` generated for them."""
        self.done, self.tokens, self.batches = self.done + questions, self.tokens + new_tokens, self.batches + 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(self.line(), refresh=False)
            self.bar.update(questions)
            return
        now = time.monotonic()
        if self.batches % self.every and now - self.last_line < PLAIN_SECONDS and self.done < self.total:
            return
        self.last_line = now
        print(self.line(), file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """A line of its own while the progress shows (on a terminal the progress line stays below it)."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> AnswerProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def answer_all(loaded: LoadedModel, prompts: list, cfg: GenerateConfig, batch_size: int, what: str,
               progress: bool = True) -> list[Answer]:
    """Greedy answers to every prompt in batches, showing how far they are (evaluation.progress). Between two
    batches a CPU share taken beside another lmtune process grows back once that process has ended."""
    answers: list[Answer] = []
    with AnswerProgress(what, len(prompts), batch_size, enabled=progress) as shown:
        for start in range(0, len(prompts), batch_size):
            batch = generate_batch(loaded, prompts[start : start + batch_size], cfg, batch_size=batch_size)
            answers += batch
            shown.update(len(batch), sum(a.new_tokens for a in batch))
            if loaded.device == "cpu":
                reclaim_cpu_threads(log=shown.write)
    return answers

"""What training shows while it runs: one progress bar with the figures that matter (step, loss, learning rate,
tokens/s, ETA) on a terminal, a plain line now and then when the output is a file or a pipe, and validation
results as they come. Every log entry still goes to train_log.jsonl whole; on screen only with --verbose.

It replaces the Trainer's own ProgressCallback (a bar per evaluation besides the training bar, with cursor-up
escapes that litter a log file) and PrinterCallback (one raw dictionary per step).
"""

from __future__ import annotations

import sys
import time

from transformers import TrainerCallback

PLAIN_LINES = 20  # lines per run when not on a terminal (and one at least every PLAIN_SECONDS)
PLAIN_SECONDS = 60.0


def _eta(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class ConsoleProgress(TrainerCallback):
    def __init__(self, verbose: bool = False, stream=None):
        self.verbose = verbose
        self.stream = stream or sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        self.figures: dict[str, str] = {"loss": "-", "lr": "-", "tok/s": "-"}
        self.last_line = 0.0

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step, self.start_time = state.global_step, time.monotonic()
        self.start_tokens = state.num_input_tokens_seen or 0
        self.warmed_up = False
        if self.terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            file=self.stream, dynamic_ncols=True)

    def _tokens_per_second(self, state) -> float | None:
        seconds = time.monotonic() - self.start_time
        tokens = (state.num_input_tokens_seen or 0) - self.start_tokens
        return tokens / seconds if tokens and seconds > 0 else None

    def on_step_end(self, args, state, control, **kwargs):
        speed = self._tokens_per_second(state)
        if speed is not None:
            self.figures["tok/s"] = f"{speed:,.0f}"
        if not self.warmed_up and state.global_step > self.start_step:
            # The first step carries the compile of the decoder layers and the warm-up (a minute or more on a CPU,
            # many times a later step): tokens/s and the ETA are measured from its end, or they would read hours.
            self.warmed_up = True
            self.start_step, self.start_time = state.global_step, time.monotonic()
            self.start_tokens = state.num_input_tokens_seen or 0
        if self.bar is not None:
            self.bar.set_postfix(self.figures, refresh=False)
            self.bar.update(state.global_step - self.bar.n)
        elif state.global_step % max(1, args.logging_steps):  # a logged step is reported with its loss, in on_log
            self._plain_line(state)

    def _plain_line(self, state) -> None:
        every = max(1, state.max_steps // PLAIN_LINES)
        now = time.monotonic()
        if state.global_step % every and now - self.last_line < PLAIN_SECONDS and state.global_step != state.max_steps:
            return
        self.last_line = now
        done = state.global_step - self.start_step
        left = (now - self.start_time) / done * (state.max_steps - state.global_step) if done else 0
        figures = ", ".join(f"{k} {v}" for k, v in self.figures.items())
        if done or state.global_step == state.max_steps:
            eta = f"ETA {_eta(left)}"
        else:
            eta = "ETA after the next step (the first one warms up)"
        self._write(f"step {state.global_step}/{state.max_steps}: {figures}, {eta}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self.verbose:
            self._write(str(dict(logs)))
        if "loss" in logs:
            self.figures["loss"] = f"{float(logs['loss']):.4g}"
            if "learning_rate" in logs:
                self.figures["lr"] = f"{float(logs['learning_rate']):.2e}"
            if self.bar is not None:
                self.bar.set_postfix(self.figures)
            else:
                self._plain_line(state)
        if "eval_loss" in logs:
            self._write(f"validation loss {float(logs['eval_loss']):.4f} at step {state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ReclaimCpuThreads(TrainerCallback):
    """On the CPU, after a step: a share of the cores taken beside another lmtune process (model.configure_cpu_threads)
    grows back once that process has ended (model.reclaim_cpu_threads reads the registry every few seconds at most)
    and says so on the console, above the progress bar."""

    def __init__(self, show: bool = True, stream=None):
        self.show = show
        self.stream = stream or sys.stderr

    def _write(self, message: str) -> None:
        if self.show:
            from tqdm.auto import tqdm

            tqdm.write(message, file=self.stream)  # clears and redraws a progress bar on the terminal

    def on_step_end(self, args, state, control, **kwargs):
        from ..model import reclaim_cpu_threads

        reclaim_cpu_threads(log=self._write)

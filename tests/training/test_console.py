"""The training console's plain progress lines: tokens/s and the ETA measured past the first step, which carries the
compile and the warm-up."""

from __future__ import annotations

import io
from types import SimpleNamespace

from lmtune.training import console
from lmtune.training.console import ConsoleProgress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_eta_and_speed_leave_out_the_first_step(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    stream = io.StringIO()  # not a terminal: plain lines
    progress = ConsoleProgress(stream=stream)
    args = SimpleNamespace(logging_steps=1)
    state = SimpleNamespace(global_step=0, max_steps=11, num_input_tokens_seen=0)
    progress.on_train_begin(args, state, None)

    def step(seconds: float, tokens: int):
        clock.now += seconds
        state.global_step += 1
        state.num_input_tokens_seen += tokens
        progress.on_step_end(args, state, None)
        progress.last_line = 0.0  # every step gets its line (lines are otherwise spaced in time)
        progress.on_log(args, state, None, logs={"loss": 2.0, "learning_rate": 1e-3})

    step(100.0, 1000)  # the compile: 10 tokens/s
    step(2.0, 1000)  # then 500 tokens/s, 2 s a step
    step(2.0, 1000)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "step 1/11: loss 2, lr 1.00e-03, tok/s 10, ETA after the next step (the first one warms up)"
    assert lines[1] == "step 2/11: loss 2, lr 1.00e-03, tok/s 500, ETA 18 s"  # 9 steps left at 2 s, not at 34 s
    assert lines[2] == "step 3/11: loss 2, lr 1.00e-03, tok/s 500, ETA 16 s"


def test_a_one_step_run_ends_with_eta_zero(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(console.time, "monotonic", clock)
    stream = io.StringIO()
    progress = ConsoleProgress(stream=stream)
    args = SimpleNamespace(logging_steps=1)
    state = SimpleNamespace(global_step=0, max_steps=1, num_input_tokens_seen=0)
    progress.on_train_begin(args, state, None)
    clock.now += 5.0
    state.global_step, state.num_input_tokens_seen = 1, 50
    progress.on_step_end(args, state, None)
    progress.on_log(args, state, None, logs={"loss": 1.5})
    assert stream.getvalue().splitlines() == ["step 1/1: loss 1.5, lr -, tok/s 10, ETA 0 s"]

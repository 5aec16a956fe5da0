"""Training runs started from the web UI: each one an `lmtune train` subprocess, watched through its files.

Why a subprocess and not a thread: the graceful stop of `lmtune train` is a signal (SIGINT: finish the step,
write a checkpoint, exit), and Python delivers signals to a process's main thread only; a subprocess also
keeps the UI answering while training holds the CPU, and is exactly the command a user would type, so a run
started here resumes from a terminal and the other way round. The UI reads what the run writes anyway:
`train_log.jsonl` (one line per logged step, see training.train) and its console output, kept in
`<runs>/<name>.log`. The command of each run is kept in `<runs>/<name>.ui.json`, so a run stopped before the UI
was restarted can still be resumed from the page.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ..errors import LmtuneError
from ..outputs import LOG_FILE, MANIFEST_FILE, read_json, write_json
from ..training.checkpoints import complete_checkpoints, partial_dir

EXIT_INTERRUPTED = 130  # what `lmtune train` returns after a graceful stop (cli.EXIT_INTERRUPTED)
# "data: ... 434 samples, 20000 tokens" (SFT) and "data: 8 rows ...: 8 pairs (...); 1980 tokens" (preference)
_TOKENS = re.compile(r"^data: .*?\b(\d+) tokens")
_STEPS = re.compile(r"^training: (\d+) optimizer steps")
_CONSOLE_SPEED = re.compile(r"^step \d+/\d+: .*\btok/s ([\d,]+)")  # training.console's plain progress line
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BAR = re.compile(r"^.{0,60}?\s*\d+%\|")  # a tqdm progress bar: "tokenizing:  40%|████      | 4/10 [...]"
ADAPTER_CONFIG = "adapter_config.json"  # what peft writes into an adapter folder (a full fine-tune writes none)
# The preference figures of a log entry (training/methods/preference.py, kto.py) the page shows beside the loss;
# with validation the same names with "eval_" in front.
REWARDS = ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected", "rewards/desirable",
           "rewards/undesirable", "kl")


class TrainingBusy(LmtuneError):
    """A second training start while one runs: one training at a time per UI process."""

    def __init__(self, name: str, step: int, total: int | None):
        self.name, self.step, self.total = name, step, total
        super().__init__(f"a training run is already running ({name}, step {step} of {total or '?'})")


def console_lines(text: str) -> list[str]:
    """The lines a terminal would show: progress bars redraw themselves (carriage returns), so only the newest
    state of a bar is kept, in the place of its first drawing."""
    lines: list[str] = []
    bar_at = None
    for line in _ANSI.sub("", text).split("\n"):
        line = line.rstrip("\r").rsplit("\r", 1)[-1].rstrip()
        if not line or line.startswith(("{'loss'", "{'eval_loss'")):  # the Trainer's log entries: the page plots them
            continue
        if _BAR.match(line):
            if bar_at is not None and bar_at == len(lines) - 1:
                lines[bar_at] = line
                continue
            bar_at = len(lines)
        lines.append(line)
    return lines


def _rewards(losses: list[dict], evals: list[dict]) -> dict:
    """The newest preference figures of the log ({"accuracy": 0.75, "margin": 0.3, "eval_accuracy": ...}), and the
    reward accuracy of every logged step ("accuracy_points"); empty for a method that logs none (LoRA)."""
    found = {}
    for entries, prefix in ((losses, ""), (evals, "eval_")):
        for name in REWARDS:
            value = next((e[prefix + name] for e in reversed(entries) if prefix + name in e), None)
            if value is not None:
                found[prefix + name.removeprefix("rewards/")] = value
    points = [[e["step"], e["rewards/accuracy"]] for e in losses if "rewards/accuracy" in e]
    if points:
        found["accuracy_points"] = points
    return found


def _seconds(iso: str) -> float:
    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S%z").timestamp()


@dataclass
class Run:
    """A training run of the UI: its name, folders and the `lmtune train` flags it was started with."""

    name: str
    runs_dir: Path
    flags: list[str] = field(default_factory=list)

    @property
    def output_dir(self) -> Path:
        return self.runs_dir / self.name

    @property
    def partial(self) -> Path:
        return partial_dir(self.output_dir)

    @property
    def console_log(self) -> Path:
        return self.runs_dir / f"{self.name}.log"

    @property
    def finished(self) -> bool:
        return (self.output_dir / MANIFEST_FILE).is_file()

    @property
    def method(self) -> str | None:
        """train.method of a finished run, from its manifest (None before it has one)."""
        try:
            return read_json(self.output_dir / MANIFEST_FILE)["method"]["method"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @property
    def adapter(self) -> bool:
        """Finished with an adapter: what a later run may continue (train.init_adapter)."""
        return self.finished and (self.output_dir / ADAPTER_CONFIG).is_file()

    @property
    def resumable(self) -> bool:
        return not self.finished and bool(complete_checkpoints(self.partial))

    def save(self) -> None:
        write_json(self.runs_dir / f"{self.name}.ui.json", {"name": self.name, "flags": self.flags})

    def log_entries(self) -> list[dict]:
        for folder in (self.partial, self.output_dir):
            path = folder / LOG_FILE
            if path.is_file():
                entries = []
                for line in path.read_text(encoding="utf-8").splitlines():
                    try:
                        entries.append(json.loads(line))
                    except ValueError:  # a line being written right now
                        pass
                return entries
        return []

    def console(self) -> list[str]:
        try:
            return console_lines(self.console_log.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            return []


class TrainingRuns:
    """Starts, stops, resumes and reports the UI's training runs; at most one runs at a time."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = runs_dir
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.run: Run | None = None  # the run started last by this process (running or not)
        self._process: subprocess.Popen | None = None
        self._started = 0.0
        self._stop_requested = False

    # ------------------------------------------------------------ control

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, name: str, flags: list[str], resume: bool = False) -> Run:
        with self._lock:
            if self.running():
                status = self.status()
                raise TrainingBusy(self.run.name, status.get("step") or 0, status.get("total_steps"))
            run = Run(name, self.runs_dir, flags)
            run.save()
            argv = [sys.executable, "-m", "lmtune", "train", *flags, "--output-dir", str(run.output_dir)]
            if resume:
                argv.append("--resume")
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with open(run.console_log, "a" if resume else "w", encoding="utf-8") as console:
                console.write(f"$ lmtune train {' '.join(argv[4:])}\n")
                console.flush()
                # A session of its own: Ctrl-C in the UI's terminal reaches the UI only, which then sends the run
                # exactly one SIGINT (a second one would make it quit without its checkpoint).
                self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console,
                                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.run, self._started, self._stop_requested = run, time.time(), False
            return run

    def stop(self) -> bool:
        """The graceful stop of `lmtune train` (Ctrl-C): it finishes the step, saves a checkpoint and exits."""
        with self._lock:
            if not self.running():
                return False
            if not self._stop_requested:  # a second SIGINT would quit at once, without the checkpoint
                self._process.send_signal(signal.SIGINT)
                self._stop_requested = True
            return True

    def shutdown(self, timeout: float = 60) -> None:
        """When the UI exits: stop a running training gracefully, so that it can be resumed."""
        if self.stop():
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass

    def find(self, name: str) -> Run:
        meta = self.runs_dir / f"{name}.ui.json"
        if "/" in name or "\\" in name or not meta.is_file():
            raise LmtuneError(f"no training run named {name!r} in {self.runs_dir}")
        return Run(name, self.runs_dir, read_json(meta)["flags"])

    def runs(self) -> list[dict]:
        """Every run of the UI's folder, newest first: name, finished or resumable."""
        found = []
        for meta in sorted(self.runs_dir.glob("*.ui.json"), key=lambda p: p.stat().st_mtime, reverse=True):
            run = Run(meta.name.removesuffix(".ui.json"), self.runs_dir)
            active = self.run is not None and self.run.name == run.name and self.running()
            found.append({"name": run.name, "finished": run.finished, "resumable": run.resumable and not active,
                          "running": active, "adapter": run.adapter, "method": run.method,
                          "output_dir": str(run.output_dir)})
        return found

    # ------------------------------------------------------------ progress

    def status(self, name: str | None = None) -> dict:
        """What the page shows: state, step of total, loss points, learning rate, tokens/s, time left, console tail."""
        run = self.run if name is None or (self.run and self.run.name == name) else self.find(name)
        if run is None:  # a UI started again: show the newest run it finds
            newest = self.runs()
            if not newest:
                return {"state": "idle"}
            run = self.find(newest[0]["name"])
        current = run is self.run
        alive = current and self.running()
        console = run.console()
        entries = run.log_entries()
        losses = [e for e in entries if "loss" in e]
        evals = [e for e in entries if "eval_loss" in e]
        total = tokens = None
        for line in console:
            if m := _TOKENS.match(line):
                tokens = int(m.group(1))
            elif m := _STEPS.match(line):
                total = int(m.group(1))
        status = {"run": run.name, "output_dir": str(run.output_dir), "total_steps": total,
                  "train": [[e["step"], e["loss"]] for e in losses],
                  "val": [[e["step"], e["eval_loss"]] for e in evals],
                  "step": losses[-1]["step"] if losses else 0,
                  "epoch": losses[-1].get("epoch") if losses else 0,
                  "loss": losses[-1]["loss"] if losses else None,
                  "lr": losses[-1].get("learning_rate") if losses else None,
                  "console": console[-14:], "resumable": False, "error": None,
                  "rewards": _rewards(losses, evals)}
        if alive:
            status["elapsed"] = time.time() - self._started
            status.update(self._speed(losses, tokens, total, console))
            if self._stop_requested:
                status["state"] = "stopping"
            elif any(line.startswith(("saved adapter to", "saved model to")) for line in console):
                status["state"] = "evaluating"
            else:
                status["state"] = "running" if losses or total else "starting"
            return status
        if current and self._process is not None:
            # how long it ran: until its last line (its console log's last write), as "Elapsed" showed while it ran
            try:
                status["elapsed"] = max(0.0, run.console_log.stat().st_mtime - self._started)
            except OSError:
                pass
        code = self._process.returncode if current and self._process is not None else None
        if run.finished and code in (None, 0):
            status["state"] = "finished"
        elif code in (None, EXIT_INTERRUPTED):  # stopped here, or found stopped (or killed) when the UI started
            status["state"], status["resumable"] = "stopped", run.resumable
        else:
            errors = [line for line in console if line.startswith("error: ")]
            status["state"] = "failed"
            status["error"] = "\n".join(errors) if errors else (console[-1] if console else f"lmtune train exited with {code}")
        return status

    def _speed(self, losses: list[dict], tokens: int | None, total: int | None, console: list[str] = ()) -> dict:
        """Steps and tokens per second over the entries this process logged, and the time left at that pace."""
        since = [e for e in losses if _seconds(e["time"]) >= int(self._started)]
        if len(since) < 2:
            return {}
        span = _seconds(since[-1]["time"]) - _seconds(since[0]["time"])
        if span <= 0:  # the log's clock counts whole seconds
            span = max(time.time() - _seconds(since[0]["time"]), 1.0)
        per_second = (since[-1]["step"] - since[0]["step"]) / span
        speed = {"steps_per_s": per_second}
        last = since[-1]
        if tokens and last.get("epoch"):  # tokens of one epoch x epochs done per step
            speed["tokens_per_s"] = per_second * tokens * last["epoch"] / last["step"]
        # The figure the console prints (tokens seen per second of training, training.console) wins when there is
        # one, so that the page and the terminal never show two speeds for one run.
        shown = [m.group(1) for line in console if (m := _CONSOLE_SPEED.match(line))]
        if shown:
            speed["tokens_per_s"] = float(shown[-1].replace(",", ""))
        if total and per_second > 0:
            speed["eta_s"] = (total - last["step"]) / per_second
        return speed

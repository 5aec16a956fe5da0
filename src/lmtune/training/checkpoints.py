"""Interrupt and resume: the run folder, complete checkpoints, and a graceful stop on Ctrl-C / SIGTERM.

A training run lives in `<output_dir>.partial/` until it finishes, then that folder (minus its
checkpoints) is renamed to `<output_dir>`. Inside, the Trainer writes `checkpoints/checkpoint-N/`
(adapter, optimizer, scheduler, RNG states, trainer state with the data position). The Trainer
writes those files in place, so a process killed mid-save leaves a half-written folder; we mark a
checkpoint complete only after every file is flushed to disk (`lmtune_checkpoint.json`, written
last and atomically) and never resume from an unmarked one. The Trainer can resume; what it lacks
is this completeness marker, a signal handler that stops at a step boundary, and a stable folder
to find the run in, so those are written here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import LmtuneError, OutputExistsError, TrainingInterrupted
from ..outputs import check_output_free, move_into_place
from ..processes import is_main_process, world_size

PARTIAL_SUFFIX = ".partial"
CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "lmtune_checkpoint.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def partial_dir(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    return output_dir.parent / (output_dir.name + PARTIAL_SUFFIX)


def _step_of(folder: Path) -> int:
    match = _CHECKPOINT_NAME.match(folder.name)
    return int(match.group(1)) if match else -1


def _checkpoint_folders(run_dir: Path) -> list[Path]:
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and _step_of(p) >= 0), key=_step_of)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    return [p for p in _checkpoint_folders(run_dir) if is_complete(p)]


def mark_complete(checkpoint: Path, step: int) -> None:
    """Flush every file of a checkpoint to disk, then write the marker atomically: marker present => files whole."""
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                try:
                    os.fsync(f.fileno())
                except OSError:  # Windows cannot fsync a file opened for reading
                    pass
    tmp = checkpoint / (COMPLETE_MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint / COMPLETE_MARKER)
    _fsync_dir(checkpoint)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; renames there are durable enough for this purpose
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(run_dir: Path, keep: int, protect: str | Path | None = None) -> None:
    """Delete half-written checkpoints and all but the newest `keep` complete ones (never `protect`, the best one)."""
    protect = Path(protect).resolve() if protect else None
    remove_incomplete(run_dir)  # called right after a save is marked: any unmarked folder is one that died
    complete = complete_checkpoints(run_dir)
    for p in complete[: max(0, len(complete) - keep)]:
        if protect is None or p.resolve() != protect:
            delete_checkpoint(p)


def delete_checkpoint(checkpoint: Path) -> None:
    """Marker first: a deletion cut short (a kill, a second Ctrl-C) leaves an incomplete checkpoint, never a
    "complete" one with files missing."""
    (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(checkpoint, ignore_errors=True)


def remove_incomplete(run_dir: Path) -> list[Path]:
    """Drop every unmarked checkpoint folder (left by a process that died while saving it)."""
    removed = [p for p in _checkpoint_folders(run_dir) if not is_complete(p)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def resume_command(run_config: Path) -> str:
    """What a user types to continue: the command that was run with a plain --resume (the newest complete
    checkpoint of the run), or, for a run started from Python or by quickstart, `lmtune train` on the
    run's own saved config."""
    if sys.argv[1:2] != ["train"]:
        command = f"lmtune train --config {shlex.quote(str(run_config))} --resume"
    else:
        args, tokens = [], sys.argv[1:]
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token == "--resume":  # an explicit checkpoint may be pruned by now: resume from the newest
                i += 2 if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") else 1
                continue
            if not token.startswith("--resume="):
                args.append(token)
            i += 1
        command = "lmtune " + shlex.join(args + ["--resume"])
    processes = world_size()
    if processes > 1:
        command += f"\n  (with the same launcher and {processes} processes: the data position is per process)"
    return command


# Settings a resumed run may change: they do not alter what is learned.
RESUMABLE_CHANGES = {"train.resume", "train.overwrite_output_dir", "train.checkpoint_minutes", "train.keep_checkpoints",
                     "train.logging_steps", "train.output_dir"}
RUN_CONFIG_FILE = "lmtune_config.yaml"


@dataclass
class RunFolder:
    """Where a training run writes while it runs (`partial`) and where it ends up (`final`)."""

    final: Path
    partial: Path
    overwrite: bool
    resume_from: Path | None = None

    @property
    def checkpoints(self) -> Path:
        return self.partial / CHECKPOINTS_DIR

    @property
    def resume_step(self) -> int | None:
        return _step_of(self.resume_from) if self.resume_from else None

    def newest_checkpoint(self) -> Path | None:
        done = complete_checkpoints(self.partial)
        return done[-1] if done else None

    def start(self, config, log: Callable[[str], None] = print) -> None:
        """Create the run folder with the run's config (a resumed run already has both)."""
        saved = self.partial / RUN_CONFIG_FILE
        if self.resume_from:  # the folder and its config exist; open_run_folder checked the settings
            return
        if self.partial.exists():
            shutil.rmtree(self.partial)  # a run that died before its first complete checkpoint
        self.partial.mkdir(parents=True)
        config.save_yaml(saved)

    def finish(self) -> None:
        """Drop the checkpoints and rename the run folder into place: the output appears whole or not at all."""
        for checkpoint in _checkpoint_folders(self.partial):
            delete_checkpoint(checkpoint)
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        move_into_place(self.partial, self.final, self.overwrite)

    def discard_unless_resumable(self, error: BaseException) -> bool:
        """After a failure: keep the run folder when it can be resumed, else remove it. Returns True if kept."""
        interrupted = isinstance(error, (KeyboardInterrupt, TrainingInterrupted, SystemExit))
        # A user error (bad data, diverged loss) is not fixed by resuming; a crash or a kill may be.
        resumable = bool(complete_checkpoints(self.partial)) and (interrupted or not isinstance(error, LmtuneError))
        if not resumable:
            shutil.rmtree(self.partial, ignore_errors=True)
        return resumable


def _check_same_training(config, saved: Path) -> None:
    import yaml

    def flat(d: dict) -> dict:
        return {f"{section}.{name}": value for section, values in d.items() for name, value in (values or {}).items()}

    before = flat(yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
    now = flat(config.to_dict())
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
               if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k)]
    if changed:
        raise LmtuneError(f"--resume: this command trains differently from the interrupted run ({saved}): "
                          + "; ".join(changed) + ". Resume with the same settings, or drop --resume and pass --overwrite")


def open_run_folder(output_dir: str | Path, overwrite: bool, resume: bool | str, log: Callable[[str], None] = print,
                    config=None) -> RunFolder:
    """Check the output and locate the run folder (nothing is written yet). With `resume`: find the checkpoint,
    refuse a `config` that would train differently, and drop half-written checkpoints and any later than the
    one resumed from (they belong to the abandoned continuation and would be taken for this run's)."""
    final = check_output_free(output_dir, overwrite)
    partial = partial_dir(final)
    if resume:
        checkpoint = find_resume_checkpoint(partial if resume is True else Path(str(resume)), partial)
        run_dir = checkpoint.parent.parent
        saved = run_dir / RUN_CONFIG_FILE
        if config is not None and saved.is_file():
            _check_same_training(config, saved)
        if is_main_process():
            removed = remove_incomplete(run_dir)
            if removed:
                log(f"resume: ignored {len(removed)} half-written checkpoint(s) ({', '.join(p.name for p in removed)})")
            later = [p for p in complete_checkpoints(run_dir) if _step_of(p) > _step_of(checkpoint)]
            for p in later:
                delete_checkpoint(p)
            if later:
                log(f"resume: removed {len(later)} checkpoint(s) later than {checkpoint.name} ({', '.join(p.name for p in later)})")
        return RunFolder(final, run_dir, overwrite, checkpoint)
    done = complete_checkpoints(partial)
    if done and not overwrite:
        raise OutputExistsError(
            f"{partial} holds an interrupted run (last checkpoint: step {_step_of(done[-1])}); "
            f"continue it with --resume, or start over with --overwrite"
        )
    return RunFolder(final, partial, overwrite)


def find_resume_checkpoint(where: Path, default_run: Path) -> Path:
    """`where` is a run folder (`<output>.partial`) or one checkpoint in it; return the checkpoint to load."""
    if _step_of(where) >= 0 and where.parent.name == CHECKPOINTS_DIR:
        if not is_complete(where):
            raise LmtuneError(f"--resume {where}: this checkpoint was not completely written (no {COMPLETE_MARKER}); "
                              f"pass its run folder to use the newest complete one")
        return where
    if not where.is_dir():
        hint = f" (the run folder for this --output-dir is {default_run})" if where != default_run else ""
        raise LmtuneError(f"--resume: {where} does not exist, so there is no interrupted run to continue{hint}; "
                          f"drop --resume to start training")
    done = complete_checkpoints(where)
    if not done:
        found = [p.name for p in _checkpoint_folders(where)]
        raise LmtuneError(f"--resume: {where} has no complete checkpoint"
                          + (f" (only half-written ones: {', '.join(found)})" if found else "")
                          + "; drop --resume and pass --overwrite to start over")
    return done[-1]


class GracefulStop:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current optimizer step.

    A second signal raises KeyboardInterrupt at once: the checkpoint being written (if any) stays
    unmarked and is ignored later, so the last complete one is never damaged.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.signal_name: str | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self._restore()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        message = (f"\n{self.signal_name} received: finishing this optimizer step and writing a checkpoint "
                   f"(press Ctrl-C again to quit at once)")
        try:
            self.log(message)
        except RuntimeError:  # the signal arrived in the middle of a print: write past Python's buffered stream
            os.write(2, (message + "\n").encode())


def _all_ranks_agree(*flags: bool) -> list[bool]:
    """In a multi-process run every rank must save and stop at the same step, or the others wait forever:
    a flag raised on any rank counts for all."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(flags)
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    values = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def _wait_for_every_rank() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoint_callback(stop: GracefulStop, run_dir: Path, every_minutes: float, keep: int):
    """Saves on a stop request and at least every `every_minutes`; marks each save complete and prunes old ones."""
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        def __init__(self):
            self.last_save = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            due = every_minutes > 0 and time.monotonic() - self.last_save >= every_minutes * 60
            stopping, due = _all_ranks_agree(stop.requested, due)
            if stopping or due:
                control.should_save = True
            if stopping:
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            self.last_save = time.monotonic()
            _wait_for_every_rank()  # each rank writes its own RNG state file: mark complete only once all are on disk
            if state.is_world_process_zero:
                mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)
                prune_checkpoints(run_dir, keep, protect=state.best_model_checkpoint)
            return control

    return CheckpointCallback()

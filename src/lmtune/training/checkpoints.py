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

import atexit
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import LmtuneError, OutputExistsError, TrainingInterrupted
from ..outputs import (
    MANIFEST_FILE,
    check_output_free,
    command_line,
    move_into_place,
    read_json,
)
from ..processes import is_main_process, world_size

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

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
    program = invoked_program()
    if sys.argv[1:2] != ["train"]:
        command = f"{program} train --config {shlex.quote(str(run_config))} --resume"
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
        command = f"{program} " + shlex.join(args + ["--resume"])
    processes = world_size()
    if processes > 1:
        command += f"\n  (with the same launcher and {processes} processes: the data position is per process)"
    return command


def invoked_program() -> str:
    """The lmtune command as the user typed it: `.venv/bin/lmtune` fails as plain `lmtune` when the venv is not
    activated, and `python -m lmtune` needs that python. From a Python program (or a test), plain `lmtune`."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "__main__.py" and argv0.parent.name == "lmtune":
        return shlex.join([sys.executable, "-m", "lmtune"])
    if argv0 is not None and argv0.stem in ("lmtune", "lmtune-script"):
        return shlex.quote(str(argv0))
    return "lmtune"


# Settings a resumed run may change: they do not alter what is learned.
RESUMABLE_CHANGES = {"train.resume", "train.overwrite_output_dir", "train.checkpoint_minutes", "train.keep_checkpoints",
                     "train.logging_steps", "train.output_dir", "train.report_to"}
RUN_CONFIG_FILE = "lmtune_config.yaml"


LOCK_SUFFIX = ".lock"


class RunLock:
    """One training process at a time per run folder: `<run folder>.lock`, locked with flock while the run
    writes and holding who it is (pid, host, start time, command), so that a second `lmtune train` or `--resume`
    on the same output is refused with that name instead of both writing into one folder.

    The OS drops a flock when its process dies, however it dies (kill -9, out of memory, power cut), so a lock
    file that still names a process but whose lock is free was left by a run that died: it is taken over, with a
    notice. A run that ends deletes the file. Under torchrun only rank 0 takes it: one lock per job. Platforms
    without flock (Windows) are not locked.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir.parent / (run_dir.name + LOCK_SUFFIX)
        self._fd: int | None = None

    def acquire(self, log: Callable[[str], None] = print) -> None:
        if fcntl is None or self._fd is not None:
            return
        left = _HELD_LOCKS.get(self.path)
        if left is not None:  # this process's own lock, from a train() that failed before its run started
            left.release()
        if not self.path.parent.is_dir():
            return  # nothing can be running in a folder that does not exist (and a typo must not create one)
        deadline = time.monotonic() + 2
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                if time.monotonic() < deadline:  # perhaps only another run's check(), which lets go at once
                    time.sleep(0.1)
                    continue
                raise LmtuneError(f"another training run is still writing to {self.path.with_suffix('')}: "
                                  f"{_who(holder)}. Wait for it to end or stop it first; two runs on one output would "
                                  f"overwrite each other's checkpoints (--overwrite does not change this)") from None
            try:  # the holder deletes the file when it ends; if it did so after we opened it, we locked a dead file
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read_holder(fd)
        if previous:
            log(f"lock: the run that held {self.path} ({_who(previous)}) is no longer running (killed, or its machine "
                f"stopped); taking over its run folder")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": command_line()}).encode())
        os.fsync(fd)
        self._fd = fd
        _HELD_LOCKS[self.path] = self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: a file left behind would be read as a dead run's
        os.close(self._fd)
        self._fd = None
        _HELD_LOCKS.pop(self.path, None)


_HELD_LOCKS: dict[Path, RunLock] = {}


@atexit.register
def _release_held_locks() -> None:
    # A run that stopped with an error before it started (bad data, a missing model) leaves no lock file behind
    # to be mistaken for a dead run's; a killed process never gets here, which is what marks its lock stale.
    for lock in list(_HELD_LOCKS.values()):
        lock.release()


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _who(holder: dict) -> str:
    if not holder:
        return "a process that has not yet written its name"
    who = f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
    return who + (f" ({holder['command']})" if holder.get("command") else "")


@dataclass
class RunFolder:
    """Where a training run writes while it runs (`partial`) and where it ends up (`final`)."""

    final: Path
    partial: Path
    overwrite: bool
    resume_from: Path | None = None
    lock: RunLock | None = None  # held by rank 0 from open_run_folder until finish or discard

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
        try:
            for checkpoint in _checkpoint_folders(self.partial):
                delete_checkpoint(checkpoint)
            shutil.rmtree(self.checkpoints, ignore_errors=True)
            move_into_place(self.partial, self.final, self.overwrite)
        finally:
            self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def discard_unless_resumable(self, error: BaseException) -> bool:
        """After a failure: keep the run folder when it can be resumed, else remove it. Returns True if kept."""
        interrupted = isinstance(error, (KeyboardInterrupt, TrainingInterrupted, SystemExit))
        # A user error (bad data, diverged loss) is not fixed by resuming; a crash or a kill may be.
        resumable = bool(complete_checkpoints(self.partial)) and (interrupted or not isinstance(error, LmtuneError))
        if not resumable:
            shutil.rmtree(self.partial, ignore_errors=True)
        self.release()
        return resumable


def _check_same_training(config, saved: Path) -> None:
    import yaml

    def flat(d: dict) -> dict:
        return {f"{section}.{name}": value for section, values in d.items() for name, value in (values or {}).items()}

    now = flat(config.to_dict())
    # A run saved by an older lmtune lacks the keys added since; they trained as their defaults do.
    before = {**flat(type(config)().to_dict()), **flat(yaml.safe_load(saved.read_text(encoding="utf-8")) or {})}
    changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(before) | set(now))
               if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k)]
    if changed:
        raise LmtuneError(f"--resume: this command trains differently from the interrupted run ({saved}): "
                          + "; ".join(changed) + ". Resume with the same settings, or drop --resume and pass --overwrite")


def open_run_folder(output_dir: str | Path, overwrite: bool, resume: bool | str, log: Callable[[str], None] = print,
                    config=None) -> RunFolder:
    """Lock the run folder and check the output (nothing else is written yet). With `resume`: find the
    checkpoint, refuse a `config` that would train differently, and drop half-written checkpoints and any later
    than the one resumed from (they belong to the abandoned continuation and would be taken for this run's).

    The lock comes first: while another process runs on this output, what its folder holds says nothing about
    what this command should do, and deleting anything there would break that run.
    """
    final = Path(output_dir)
    partial = partial_dir(final)
    lock = RunLock(_run_dir_named(resume, partial))
    if is_main_process():
        lock.acquire(log)
    try:
        if resume is True and not complete_checkpoints(partial) and (final / MANIFEST_FILE).is_file():
            raise _finished_run(final)
        run = _open_run_folder(final, partial, overwrite, resume, log, config)
    except BaseException:
        lock.release()
        raise
    run.lock = lock
    return run


def _run_dir_named(resume: bool | str, partial: Path) -> Path:
    """The run folder a command will write into (not checked yet: that is find_resume_checkpoint's job)."""
    if resume is True or not resume:
        return partial
    where = Path(str(resume))
    return where.parent.parent if _step_of(where) >= 0 and where.parent.name == CHECKPOINTS_DIR else where


def _finished_run(final: Path) -> LmtuneError:
    """`--resume` on a run that finished: say so, with when and where its adapter is; never suggest --overwrite,
    which would discard it."""
    finished = (read_json(final / MANIFEST_FILE) or {}).get("finished") or "at an unrecorded time"
    return LmtuneError(f"--resume: the run of {final} finished ({finished}); its adapter is in {final}. There is nothing "
                       f"to resume and nothing was changed; to train further, start a new run with another --output-dir")


def _open_run_folder(final: Path, partial: Path, overwrite: bool, resume: bool | str, log: Callable[[str], None],
                     config) -> RunFolder:
    check_output_free(final, overwrite)
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
                          + "; nothing to resume: run the same command without --resume to start over")
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

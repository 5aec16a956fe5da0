"""Which process this is: a launcher (`torchrun`, `accelerate launch`) starts one process per device and sets
RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE. Model loading (CPU threads), training (who writes) and the
CLI (who prints) read them here; with no launcher every function answers as for a single process.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world_size() -> int:
    """Processes taking part in the run, on all machines."""
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's index on its machine: the GPU it uses."""
    return _env_int("LOCAL_RANK", 0)


def local_world_size() -> int:
    """Processes on this machine (they share its CPU cores)."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Rank 0 alone prints progress and writes the adapter, manifest, log, plot and reports."""
    return rank() == 0


def quiet(_message: str) -> None:
    """The `log` of every process but rank 0."""


def silence_library_output() -> None:
    """On ranks other than 0: no progress bars or info messages from transformers and datasets (rank 0 shows them)."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices: rank 0 prints the same ones
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


# ---------------------------------------------------------------- sharing the CPU with other lmtune processes

# Two processes that each run one OpenMP thread per core on the same cores do not share them, they fight:
# OpenMP threads spin while they wait for each other, and a SmolLM2 training step measured 1.1 s alone and 15 to
# 46 s beside a second run. So every lmtune process that computes on the CPU registers itself here, and one that
# starts while others run takes its share of the cores. (A process does not shrink when a later one starts: the
# later one takes the smaller share. One that took a share grows back when the processes it shared with end:
# model.reclaim_cpu_threads, at training steps and between evaluation batches, reads this registry every few
# seconds and raises torch's thread count, unless the user set it.)
def _registry() -> Path:
    return Path(tempfile.gettempdir()) / f"lmtune-cpu-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def other_cpu_users() -> list[tuple[int, str]]:
    """(pid, command) of the other running lmtune processes that compute on this machine's CPU; stale entries
    (a process killed without cleaning up) are removed on the way."""
    folder = _registry()
    found = []
    for entry in folder.glob("*") if folder.is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if _alive(int(entry.name)):
            found.append((int(entry.name), entry.read_text(encoding="utf-8", errors="replace").strip()))
        else:
            entry.unlink(missing_ok=True)
    return sorted(found)


def register_cpu_user() -> None:
    """Record this process as computing on the CPU until it exits."""
    import atexit
    import sys

    global _REGISTERED
    if _REGISTERED:
        return
    folder = _registry()
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        entry = folder / str(os.getpid())
        entry.write_text(" ".join(["lmtune", *sys.argv[1:3]]) if sys.argv else "lmtune", encoding="utf-8")
    except OSError:  # a read-only or full /tmp: sharing is a courtesy, never a reason to fail
        return
    _REGISTERED = True
    atexit.register(lambda: entry.unlink(missing_ok=True))


def unregister_cpu_user() -> None:
    """This process has stopped computing for now: lmtune processes started from here on may take every core.
    For a long-lived process that computes now and then (the web UI: an estimate, a chat answer); it registers
    again the next time it loads a model."""
    global _REGISTERED
    if _REGISTERED:
        (_registry() / str(os.getpid())).unlink(missing_ok=True)
        _REGISTERED = False


_REGISTERED = False

"""Which process this is: a launcher (`torchrun`, `accelerate launch`) starts one process per device and sets
RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE. Model loading (CPU threads), training (who writes) and the
CLI (who prints) read them here; with no launcher every function answers as for a single process.
"""

from __future__ import annotations

import os


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

"""Output folders that appear whole or not at all, and run manifests.

A step writes into a hidden sibling folder and renames it into place at the end, so an
interrupted or failed run never leaves a half-written adapter or model where a user (or the
next step) would take it for a finished one. An existing folder is never replaced silently.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

from .errors import DiskFullError, OutputExistsError

# The files of a trained adapter folder, named here because training writes them and merge, evaluation,
# the quickstart and the UI read them (a constant in one stage read by another would make them import each other).
CONFIG_FILE = "lmtune_config.yaml"
MANIFEST_FILE = "lmtune_manifest.json"
LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"


def check_output_free(path: str | Path, overwrite: bool) -> Path:
    path = Path(path)
    if not str(path):
        raise OutputExistsError("no output folder given (--output-dir)")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another --output-dir or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a folder")
    return path


@contextmanager
def atomic_output(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path`, on failure it is removed."""
    final = check_output_free(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full_error(error, final) or error
    move_into_place(tmp, final, overwrite)


def umask() -> int:
    """The process's file-creation mask (022 on most systems: files 644, folders 755)."""
    try:  # Linux shows it without changing it; os.umask can only be read by setting it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_normal_permissions(path: Path) -> None:
    """Set the modes a file or folder made with open()/mkdir() gets, under the user's umask, on `path` and
    everything in it. safetensors (and tempfile) create files 0600: on a shared machine nobody else could read
    the weights while every other output file is readable. Symbolic links are left alone."""
    mask = umask()
    for item in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else [])]:
        if item.is_symlink():
            continue
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def move_into_place(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename a finished temporary folder to `final`; an existing `final` (overwrite asked for) is replaced only
    after the new one is whole, by moving it aside first and deleting it after the swap."""
    give_normal_permissions(tmp)
    if final.exists():
        if not overwrite:
            raise OutputExistsError(f"{final} appeared while this run was writing; its output is kept in {tmp}")
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def disk_full_error(error: BaseException, final: Path, flag: str = "--output-dir") -> DiskFullError | None:
    """A clear message for a full disk (or quota) while writing `final` (named by the command's `flag`); None for
    other errors."""
    if not _is_disk_full(error):
        return None
    kept = f"the previous {final} is untouched" if final.exists() else f"nothing was written to {final}"
    return DiskFullError(f"no space left on the disk while writing {final}; {kept}. "
                         f"Free some space (or choose an {flag} on another disk) and run again")


def _is_disk_full(error: BaseException | None) -> bool:
    # safetensors and torch.save report a full disk as their own error types, with the OS message inside.
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in ("No space left on device", "os error 28", "Disk quota exceeded")):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def atomic_files(paths: list[str | Path], overwrite: bool = False, flag: str = "--output") -> Iterator[list[Path]]:
    """Yield one hidden temporary path per file; on success each replaces its file, on failure all are removed.

    The files are renamed in the order given, so put the one a reader looks for last: when it
    exists, the others are complete too. `flag`: the option that named the files, for the full-disk message.
    """
    finals = [Path(p) for p in paths]
    for final in reversed(finals):  # the main file (last) is the one to name if several exist
        if final.is_dir():
            raise OutputExistsError(f"{final} is a folder; give a file name")
        if final.exists() and not overwrite:
            raise OutputExistsError(f"{final} already exists; choose another output or pass --overwrite")
    tmps = [final.parent / f".{final.name}.tmp-{os.getpid()}" for final in finals]
    for final in finals:
        final.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmps
    except BaseException as error:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise disk_full_error(error, finals[-1], flag) or error
    for tmp, final in zip(tmps, finals):
        give_normal_permissions(tmp)
        os.replace(tmp, final)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("lmtune", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json(path: str | Path, data) -> None:
    Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def command_line() -> str:
    return " ".join(sys.argv)

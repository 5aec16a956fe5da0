"""The web UI's HTTP side: one HTML page (static/) and a JSON API over the library's functions.

Every action is a call of the function the matching CLI command calls (`inspect_data`, `clean_data`,
`train(dry_run=True)`, `lmtune train` itself, `load_for_inference` + the chat decoding of `lmtune chat`,
`run_eval`, `merge`, `export_gguf`); nothing here trains, generates or scores in its own way. User mistakes come
back as the one line the CLI prints (`error: ...`, from lmtune's error classes), never as a traceback.
"""

from __future__ import annotations

import hmac
import json
import queue
import re
import threading
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from ..bundled import HELDOUT_DATA, TRAIN_DATA, bundled_path, config_files
from ..config import ConfigError, GenerateConfig, load_config, load_yaml
from ..errors import LmtuneError
from ..outputs import CONFIG_FILE
from ..processes import unregister_cpu_user
from .texts import TEXTS, choose_language, text
from .training import Trainer, TrainingBusy

STATIC = Path(__file__).parent / "static"
LANG_COOKIE, TOKEN_COOKIE = "lmtune_lang", "lmtune_ui_token"
DEFAULT_PRESET = "quickstart"
MAX_UPLOAD_BYTES = 512 << 20
# The form's settings and the `lmtune train` flags that set them.
FLAGS = {"model.name_or_path": "--model", "train.epochs": "--epochs", "train.learning_rate": "--learning-rate",
         "lora.r": "--lora.r", "data.val_size": "--val-size", "data.max_samples": "--max-samples"}
QUANTS = ["q8_0", "f16", "f32", "bf16", "q4_k_m", "q5_k_m", "q6_k"]


class UserError(Exception):
    """A refusal of the UI itself (a text key of texts.py and its values), shown in the page's language."""

    def __init__(self, key: str, status: int = 400, **values):
        super().__init__(key)
        self.key, self.status, self.values = key, status, values


def cli_message(error: BaseException) -> str:
    """What `lmtune` prints for this error (cli.main): one `error: ...` line per problem."""
    if isinstance(error, ConfigError):
        return "\n".join(f"error: {problem}" for problem in error.problems)
    if isinstance(error, LmtuneError):
        return f"error: {error}"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"internal error: {type(error).__name__}: {first}"


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
                task["error"], task["state"] = cli_message(e), "failed"
            finally:  # idle again: a training started next gets every core (processes.configure_cpu_threads)
                unregister_cpu_user()

        threading.Thread(target=target, name=f"lmtune-ui-{kind}", daemon=True).start()
        return task

    def get(self, kind: str) -> dict:
        return self._tasks.get(kind) or {"kind": kind, "state": "idle"}


class Models:
    """The base and tuned models of one run, loaded on first use for the Try page (one run's pair at a time).

    The Try page answers one question at a time, as `lmtune chat` does, so each model gets chat's compiled one-token
    decode step where `generate.compile` (the run's config, "auto" by default) says it pays (about 2x the eager
    loop on SmolLM2, inference/compiled_decode.py); it is compiled when the model loads, so the first answer
    waits for it (about a minute the first time, seconds from Inductor's disk cache)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._run: str | None = None
        self._loaded: dict[str, Any] = {}

    def get(self, run_dir: Path, side: str, compile_setting: Any = "auto"):
        from ..inference import compiled_decode
        from ..inference.load import load_for_inference
        from ..model import base_model_of_adapter

        with self._lock:
            key = str(run_dir)
            if self._run != key:
                self._loaded.clear()
                self._run = key
            if "tuned" not in self._loaded:
                tuned = load_for_inference(None, str(run_dir))
                compiled_decode.enable(tuned, compile_setting, one_answer=False)
                self._loaded["tuned"] = tuned
            if side == "base" and "base" not in self._loaded:
                base = load_for_inference(base_model_of_adapter(run_dir))
                base.template = self._loaded["tuned"].template  # asked with exactly the tuned model's prompts
                compiled_decode.enable(base, compile_setting, one_answer=False)
                self._loaded["base"] = base
            return self._loaded[side]


def _generate_config(run_dir: Path, greedy: bool, max_new_tokens: int) -> GenerateConfig:
    section = (load_yaml(run_dir / CONFIG_FILE).get("generate") or {}) if (run_dir / CONFIG_FILE).is_file() else {}
    known = {k: v for k, v in section.items() if k in GenerateConfig.__dataclass_fields__}
    return GenerateConfig(**{**known, "greedy": greedy, "max_new_tokens": max_new_tokens})


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^\w.\-]+", "_", Path(name).name, flags=re.UNICODE).strip("._")
    return cleaned or "data"


def create_app(workdir: str | Path, token: str | None = None) -> FastAPI:
    """The UI's app; everything it writes goes under `workdir` (uploads, cleaned data, runs, reports, exports)."""
    workdir = Path(workdir).resolve()
    folders = {name: workdir / name for name in ("uploads", "clean", "runs", "eval", "exports")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    trainer, tasks, models = Trainer(folders["runs"]), Tasks(), Models()
    bundled_data = bundled_path(TRAIN_DATA)
    app = FastAPI(title="lmtune UI", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.trainer, app.state.workdir = trainer, workdir
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def language(request: Request) -> str:
        return choose_language(request.headers.get("accept-language"),
                               request.headers.get("x-lmtune-lang") or request.cookies.get(LANG_COOKIE))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token:
            given = (request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
                     or request.headers.get("authorization", "").removeprefix("Bearer "))
            if not hmac.compare_digest(given.encode(), token.encode()):
                lang = language(request)
                return HTMLResponse(f"<!doctype html><meta charset=utf-8><p>{text(lang, 'unauthorized')}</p>", 401)
            if request.query_params.get("token"):  # a link with the token: keep it in a cookie, drop it from the bar
                response = RedirectResponse(request.url.path or "/", 303)
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
                return response
        return await call_next(request)

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        return JSONResponse({"error": text(language(request), e.key, **e.values)}, e.status)

    @app.exception_handler(LmtuneError)
    async def lmtune_error(request: Request, e: LmtuneError):
        return JSONResponse({"error": cli_message(e)}, 400)

    @app.exception_handler(ConfigError)
    async def config_error(request: Request, e: ConfigError):
        return JSONResponse({"error": cli_message(e)}, 400)

    @app.exception_handler(Exception)
    async def other_error(request: Request, e: Exception):
        traceback.print_exc()
        return JSONResponse({"error": cli_message(e)}, 500)

    def data_path(path: str) -> str:
        """Only files the UI offers: uploads, cleaned files, the bundled data."""
        resolved = Path(path).resolve()
        allowed = [folders["uploads"], folders["clean"], bundled_data.parent.resolve()]
        if not any(resolved.is_relative_to(folder) for folder in allowed) or not resolved.is_file():
            raise LmtuneError(f"{path}: not one of the data files of this page")
        return str(resolved)

    def run_dir(name: str) -> Path:
        run = trainer.find(name)
        if not run.finished:
            raise LmtuneError(f"the run {name} has not finished; train it to the end first")
        return run.output_dir

    # ------------------------------------------------------------ page

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        lang = language(request)
        boot = {"lang": lang, "texts": {"en": {k: v[0] for k, v in TEXTS.items()}, "vi": {k: v[1] for k, v in TEXTS.items()}}}
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        return page.replace("{{LANG}}", lang).replace("{{BOOT}}", json.dumps(boot, ensure_ascii=False).replace("</", "<\\/"))

    @app.get("/api/state")
    def state():
        return {"datasets": datasets(), "presets": presets(), "runs": trainer.runs(), "training": trainer.status(),
                "quants": QUANTS, "heldout": str(bundled_path(HELDOUT_DATA)), "bundled": str(bundled_data),
                "tasks": {kind: tasks.get(kind) for kind in ("estimate", "evaluate", "merge", "export")}}

    def datasets() -> list[dict]:
        files = [{"path": str(bundled_data), "name": f"{bundled_data.name} (bundled)", "bundled": True}]
        for folder in (folders["uploads"], folders["clean"]):
            for path in sorted(folder.iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    files.append({"path": str(path), "name": f"{folder.name}/{path.name}", "size": path.stat().st_size})
        return files

    def presets() -> dict:
        found = {}
        for path in config_files():
            c = load_config(path)
            found[path.stem] = {"path": str(path), "model": c.model.name_or_path, "epochs": c.train.epochs,
                                "learning_rate": c.train.learning_rate, "r": c.lora.r, "val_size": c.data.val_size,
                                "max_samples": c.data.max_samples}
        return found

    # ------------------------------------------------------------ data

    @app.post("/api/upload")
    async def upload(request: Request, name: str):
        body = await request.body()
        if len(body) > MAX_UPLOAD_BYTES:
            raise LmtuneError(f"{name}: larger than {MAX_UPLOAD_BYTES >> 20} MB")
        target = folders["uploads"] / _safe_name(name)
        stem, suffix, n = target.stem, target.suffix, 1
        while target.exists():
            n += 1
            target = target.with_name(f"{stem}-{n}{suffix}")
        target.write_bytes(body)
        return {"path": str(target), "name": f"uploads/{target.name}"}

    @app.post("/api/inspect")
    def inspect(body: dict):
        from ..data.inspect import inspect_data

        paths = [data_path(p) for p in body.get("paths") or []]
        if not paths:
            raise UserError("no_data_selected")
        max_length = int(body.get("max_length") or 512)
        if max_length < 2:
            raise ConfigError([f"--max-length must be at least 2, got {max_length}"])
        report = inspect_data(paths, model=(body.get("model") or "").strip(), max_length=max_length)
        return report.to_dict()

    @app.post("/api/clean")
    def clean(body: dict):
        from ..data.clean import clean_data

        paths = [data_path(p) for p in body.get("paths") or []]
        if not paths:
            raise UserError("no_data_selected")
        stem = "+".join(Path(p).stem for p in paths)[:80]
        output = folders["clean"] / f"{_safe_name(stem)}.clean.jsonl"
        report = clean_data(paths, str(output), dedupe=body.get("dedupe") or "exact", overwrite=True)
        rejects = []
        with open(report.rejects, encoding="utf-8") as f:
            for line in f:
                if len(rejects) >= 50:
                    break
                rejects.append(json.loads(line))
        return {"output": report.output, "rows_read": report.rows_read, "kept": report.kept,
                "dropped": dict(report.dropped), "fixed": dict(report.fixed), "rejects": rejects,
                "summary": report.summary()}

    # ------------------------------------------------------------ train

    def training_settings(body: dict) -> tuple[str, list[str], dict]:
        """(run name, the flags of `lmtune train`, the same settings as config overrides) from the page's form."""
        preset = body.get("preset") or DEFAULT_PRESET
        files = {p.stem: p for p in config_files()}
        if preset not in files:
            raise LmtuneError(f"unknown preset {preset!r}; choose one of {', '.join(files)}")
        paths = [data_path(p) for p in body.get("paths") or []]
        if not paths:
            raise UserError("no_data_selected")
        settings = {"model.name_or_path": str(body.get("model") or "").strip(), "train.epochs": body.get("epochs"),
                    "train.learning_rate": body.get("learning_rate"), "lora.r": body.get("r"),
                    "data.val_size": body.get("val_size"), "data.max_samples": body.get("max_samples")}
        settings = {k: v for k, v in settings.items() if v not in (None, "")}
        flags = ["--config", str(files[preset]), "--data", *paths]
        for key, value in settings.items():
            flags += [FLAGS[key], str(value)]
        overrides = {**settings, "data.paths": paths}
        if "train.epochs" in settings:
            overrides["train.max_steps"] = -1  # as --epochs on the command line (cli._train_config)
        name = _safe_name(str(body.get("name") or "").strip() or f"run-{uuid.uuid4().hex[:6]}")
        return name, flags, load_config(files[preset], _typed(overrides))

    @app.post("/api/estimate")
    def estimate(body: dict, request: Request):
        from ..training.train import train

        _, _, config = training_settings(body)

        def work():
            lines = []
            result = train(config, dry_run=True, log=lines.append)
            return {**result.dry_run_estimate, "log": lines[-3:]}

        return tasks.start("estimate", work, language(request))

    @app.post("/api/train/start")
    def start(body: dict):
        from ..model import resolve_source

        name, flags, config = training_settings(body)
        resolve_source(config.model.name_or_path)  # a mistyped model path: the CLI's message now, not after a start
        if trainer.running():
            raise busy()
        existing = trainer.runs_dir / name
        if existing.exists() or (trainer.runs_dir / f"{name}.ui.json").exists():
            raise LmtuneError(f"{existing} already exists; choose another run name")
        try:
            trainer.start(name, flags)
        except TrainingBusy:  # another start won the race since the check above
            raise busy() from None
        return trainer.status()

    def busy() -> UserError:
        status = trainer.status()
        return UserError("train_running", 409, run=status.get("run"), step=status.get("step") or 0,
                         total=status.get("total_steps") or "?")

    @app.post("/api/train/stop")
    def stop():
        if not trainer.stop():
            raise UserError("nothing_to_stop")
        return trainer.status()

    @app.post("/api/train/resume")
    def resume(body: dict):
        run = trainer.find(str(body.get("run") or ""))
        if trainer.running():
            raise busy()
        if not run.resumable:
            raise UserError("nothing_to_resume")
        try:
            trainer.start(run.name, run.flags, resume=True)
        except TrainingBusy:
            raise busy() from None
        return trainer.status()

    @app.get("/api/train/status")
    def train_status(run: str | None = None):
        return trainer.status(run)

    @app.get("/api/runs")
    def runs():
        return trainer.runs()

    # ------------------------------------------------------------ try

    @app.post("/api/chat")
    def chat(body: dict):
        from ..inference.batching import context_length, run_batch
        from ..inference.chat import answer_reserve, answer_row, fit_conversation

        folder = run_dir(str(body.get("run") or ""))
        side = "base" if body.get("side") == "base" else "tuned"
        messages = body.get("messages") or []
        question = str(messages[-1]["content"]).strip() if messages else ""
        if not question:
            raise LmtuneError("the question is empty: type a question")
        history = [(str(q["content"]), str(a["content"])) for q, a in zip(messages[:-1:2], messages[1:-1:2])]
        cfg = _generate_config(folder, bool(body.get("greedy", True)), int(body.get("max_new_tokens") or 128))
        pieces: queue.Queue = queue.Queue()
        state: dict = {}

        def work():
            try:
                loaded = models.get(folder, side, cfg.compile)
                unregister_cpu_user()  # loading registered the UI as computing; it answers for a moment only
                context = context_length(loaded)
                ids, dropped = fit_conversation(loaded, history, question, context - answer_reserve(cfg, context))
                if ids is None:
                    raise LmtuneError(f"the message is too long for this model's context of {context} tokens; shorten it")
                row = answer_row(cfg, ids, context - len(ids), lambda piece: pieces.put({"text": piece}))
                state["row"] = row
                pieces.put({"dropped": dropped} if dropped else {"started": True})
                run_batch(loaded, [row])
                pieces.put({"done": True, "finish": row.finish_reason})
            except Exception as e:  # noqa: BLE001 - streamed to the page as the CLI's one line
                if not isinstance(e, LmtuneError):
                    traceback.print_exc()
                pieces.put({"error": cli_message(e)})

        def stream():
            threading.Thread(target=work, name=f"lmtune-ui-chat-{side}", daemon=True).start()
            try:
                while True:
                    item = pieces.get()
                    yield json.dumps(item, ensure_ascii=False) + "\n"
                    if "done" in item or "error" in item:
                        return
            finally:  # the page went away: stop generating after the current token
                if "row" in state:
                    state["row"].cancelled.set()

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    @app.get("/api/report")
    def report(run: str):
        folder = run_dir(run)
        found = []
        for kind, where in (("vs_base", folders["eval"] / run), ("validation", folder / "eval")):
            if (where / "report.json").is_file():
                predictions = []
                with open(where / "predictions.jsonl", encoding="utf-8") as f:
                    for line in f:
                        predictions.append(json.loads(line))
                        if len(predictions) >= 30:
                            break
                found.append({"kind": kind, "report": json.loads((where / "report.json").read_text(encoding="utf-8")),
                              "predictions": predictions})
        return {"reports": found}

    @app.post("/api/evaluate")
    def evaluate(body: dict, request: Request):
        from ..evaluation.evaluate import run_eval
        from ..model import base_model_of_adapter

        name = str(body.get("run") or "")
        folder = run_dir(name)
        data = data_path(body.get("data") or str(bundled_path(HELDOUT_DATA)))
        max_new_tokens = int(body.get("max_new_tokens") or 128)

        def work():
            run_eval([data], str(folders["eval"] / name), adapter=str(folder), baseline=base_model_of_adapter(folder),
                     max_new_tokens=max_new_tokens, overwrite=True, log=lambda _: None)
            return {"run": name}

        return tasks.start("evaluate", work, language(request))

    # ------------------------------------------------------------ export

    @app.post("/api/merge")
    def merge_run(body: dict, request: Request):
        from ..export.merge import merge

        name = str(body.get("run") or "")
        folder = run_dir(name)
        output = folders["runs"] / f"{name}-merged"

        def work():
            merge(str(folder), str(output), overwrite=True, log=lambda _: None)
            return {"path": str(output), "commands": [
                f'lmtune generate --model {output} --greedy --prompt "Học máy là gì?"',
                f"lmtune chat --model {output}",
                f"lmtune serve --model {output}"]}

        return tasks.start("merge", work, language(request))

    @app.post("/api/export")
    def export(body: dict, request: Request):
        from ..export.exporter import export_gguf

        name = str(body.get("run") or "")
        folder = run_dir(name)
        quant = str(body.get("quant") or "q8_0")
        output = folders["exports"] / name / f"{name}-{quant}.gguf"

        def work():
            result = export_gguf(str(output), adapter=str(folder), quant=quant, ollama=True, overwrite=True,
                                 name=name, log=lambda _: None)
            model_name = result.ollama_command.split()[-3] if result.ollama_command else name
            return {"path": result.path, "size_mb": round(result.size_bytes / 1e6, 1), "quant": quant,
                    "download": f"/download/{output.relative_to(workdir)}",
                    "modelfile": f"/download/{Path(result.modelfile).relative_to(workdir)}" if result.modelfile else None,
                    "commands": [result.ollama_command, f"ollama run {model_name}",
                                 f"llama-cli -m {result.path} -cnv"]}

        return tasks.start("export", work, language(request))

    @app.get("/api/task/{kind}")
    def task(kind: str):
        return tasks.get(kind)

    @app.get("/download/{path:path}")
    def download(path: str):
        target = (workdir / path).resolve()
        if not target.is_relative_to(folders["exports"]) or not target.is_file():
            raise LmtuneError(f"{path}: no such export")
        return FileResponse(target, filename=target.name, media_type="application/octet-stream")

    return app


def _typed(overrides: dict) -> dict:
    """Form values arrive as JSON numbers or strings; the config checks the types, as it does for the command line."""
    from ..config import parse_cli_value

    return {k: parse_cli_value(v) if isinstance(v, str) and k != "model.name_or_path" else v for k, v in overrides.items()}

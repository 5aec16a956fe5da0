"""The web UI's HTTP side: one HTML page (static/) and a JSON API over the library's functions.

Every action is a call of the function the matching CLI command calls (`inspect_data`, `clean_data`,
`train(dry_run=True)`, `lmtune train` itself, `load_for_inference` + the chat decoding of `lmtune chat`,
`run_eval`, `merge`, `export_gguf`); nothing here trains, generates or scores in its own way. The routes are
grouped by job in routes/; the bodies they take are the pydantic models of requests.py. User mistakes come back
as the one line the CLI prints (`error: ...`, webguard.person_message), or as a field's name and what it must be,
never as a traceback.

Who may drive the page (docs/guarantees.md lists each promise with its test):
- only requests addressed to the names the UI listens on (webguard.HostGuard: no DNS rebinding);
- off loopback, only a browser that has the access token (`lmtune ui` prints a link with it);
- every request that changes something (upload, clean, train, stop, export, ...) only from the UI's own page:
  its Origin and Sec-Fetch-Site, when the browser sends them, must be this page's, and it must carry the
  page token, a random value made when the UI starts and written into the page it serves. Another site's page
  can send a request (a form, `fetch` with mode "no-cors") but cannot read the page, so it has no token; and a
  header of its own makes the browser ask first (a CORS preflight), which the UI never grants.
"""

from __future__ import annotations

import json
import secrets
import traceback
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from ..bundled import HELDOUT_DATA, PREFERENCE_HELDOUT_DATA, bundled_path, config_files
from ..config import ConfigError, load_config
from ..errors import LmtuneError
from ..webguard import HostCheck, HostGuard, key_matches, person_message, server_port
from .requests import QUANTS
from .routes import chat, data, export, files, runs
from .texts import TEXTS, text
from .workspace import LANG_COOKIE, MAX_UPLOADS_BYTES, UserError, Workspace, language, error_body

STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "lmtune_ui_token"
PAGE_TOKEN_HEADER = "x-lmtune-token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# Field names of the request bodies -> the texts.py key of the form field that sets them, to name a bad field
# as the page labels it.
FIELD_LABELS = {"max_length": "max_length", "max_new_tokens": "max_new_tokens", "epochs": "epochs",
                "learning_rate": "learning_rate", "r": "rank", "val_size": "val_size", "max_samples": "max_samples",
                "model": "model", "name": "run_name", "preset": "preset", "quant": "quant", "dedupe": "dedupe",
                "messages": "question", "run": "run", "paths": "datasets", "question_field": "question_field",
                "answer_field": "answer_field", "messages_field": "messages_field", "csv_delimiter": "csv_delimiter",
                "method": "method", "beta": "beta", "loss_type": "loss_type", "init_adapter": "init_adapter"}
# pydantic's error types -> (texts.py key of what the value must be, the context value it names).
PROBLEMS = {"int_parsing": "p_int", "int_type": "p_int", "int_from_float": "p_int", "float_parsing": "p_number",
            "float_type": "p_number", "string_type": "p_text", "list_type": "p_list", "bool_parsing": "p_bool",
            "bool_type": "p_bool", "missing": "p_missing", "greater_than_equal": "p_min", "greater_than": "p_above",
            "less_than_equal": "p_max", "less_than": "p_below", "literal_error": "p_choice", "too_short": "p_empty",
            "model_type": "p_object", "dict_type": "p_object", "model_attributes_type": "p_object",
            "json_invalid": "p_json"}


def field_label(lang: str, path: list[str]) -> str:
    """A field as the page labels it, with its name in the request: 'Max length (tokens) (max_length)'."""
    field = ".".join(path) or "body"
    named = None if path[:1] == ["query"] else next((p for p in path if p in FIELD_LABELS), None)  # body fields only
    return f"{text(lang, FIELD_LABELS[named])} ({field})" if named else field


def field_problem(lang: str, error: dict) -> str:
    """One pydantic error as the page says it: '<label> (<field>): <what it must be>'."""
    # a body that is not JSON at all is located at a character offset, not at a field: name the body
    path = [] if error.get("type") == "json_invalid" else [str(part) for part in error.get("loc", ()) if part != "body"]
    label = field_label(lang, path)
    key = PROBLEMS.get(error.get("type", ""))
    if key is None:
        return f"{label}: {error.get('msg', 'invalid value')}"
    context = error.get("ctx") or {}
    limit = next((context[k] for k in ("ge", "gt", "le", "lt") if k in context), "")
    return text(lang, "bad_field", field=label, problem=text(lang, key, limit=limit,
                                                             choices=context.get("expected", "")))


def create_app(workdir: str | Path, token: str | None = None, host: str = "127.0.0.1",
               model_dirs: tuple[str | Path, ...] = (), max_uploads_bytes: int = MAX_UPLOADS_BYTES) -> FastAPI:
    """The UI's app; everything it writes goes under `workdir` (uploads, cleaned data, runs, reports, exports).

    `token`: the access token off loopback (server.access_token); `host`: the address it listens on, whose names
    are the only Host it answers; `model_dirs`: folders whose models the page may name (`--model-dir`)."""
    ws = Workspace(workdir, model_dirs, max_uploads_bytes)
    page_token = secrets.token_urlsafe(24)
    check = HostCheck(host)
    app = FastAPI(title="lmtune UI", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui, app.state.page_token = ws, page_token
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def refuse_host(scope, given: str) -> dict:
        request = Request(scope)
        return {"error": text(language(request), "foreign_host")}

    def from_the_page(request: Request) -> bool:
        """Whether a request that changes something comes from this UI's own page (see the module docstring)."""
        site = request.headers.get("sec-fetch-site")
        origin = request.headers.get("origin")
        port = server_port(request.scope)
        return ((site is None or site == "same-origin") and (origin is None or check.allows_origin(origin, port))
                and key_matches(request.headers.get(PAGE_TOKEN_HEADER), page_token))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        lang = language(request)
        if token:
            given = (request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
                     or request.headers.get("authorization", "").removeprefix("Bearer "))
            if not key_matches(given, token):
                return HTMLResponse(f"<!doctype html><meta charset=utf-8><p>{text(lang, 'unauthorized')}</p>", 401)
            if request.query_params.get("token"):  # a link with the token: keep it in a cookie, drop it from the bar
                response = RedirectResponse(request.url.path or "/", 303)
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
                return response
        api = request.url.path.startswith(("/api/", "/download/"))
        if api and request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            return JSONResponse({"error": text(lang, "foreign_request")}, 403)  # another site's page, even to read
        if request.method not in SAFE_METHODS and not from_the_page(request):
            return JSONResponse({"error": text(lang, "foreign_request")}, 403)
        return await call_next(request)

    # Outermost, so that a request for another Host gets nothing, not even the token check's page.
    app.add_middleware(HostGuard, host=host, refuse=refuse_host)

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        values = dict(e.values)
        if "field" in values:  # a field named by a refusal of the UI: with its label, as bad_field names it
            values["field"] = field_label(language(request), [values["field"]])
        return JSONResponse({"error": text(language(request), e.key, **values)}, e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_field(request: Request, e: RequestValidationError):
        errors = list(e.errors()) or [{}]
        return JSONResponse({"error": field_problem(language(request), errors[0])}, 400)

    @app.exception_handler(LmtuneError)
    async def lmtune_error(request: Request, e: LmtuneError):
        return JSONResponse(error_body(language(request), e), 400)

    @app.exception_handler(ConfigError)
    async def config_error(request: Request, e: ConfigError):
        return JSONResponse(error_body(language(request), e), 400)

    @app.exception_handler(Exception)
    async def other_error(request: Request, e: Exception):
        traceback.print_exc()
        return JSONResponse({"error": person_message(e)}, 500)

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        lang = language(request)
        boot = {"lang": lang, "token": page_token,
                "texts": {"en": {k: v[0] for k, v in TEXTS.items()}, "vi": {k: v[1] for k, v in TEXTS.items()}}}
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        return page.replace("{{LANG}}", lang).replace("{{BOOT}}", json.dumps(boot, ensure_ascii=False).replace("</", "<\\/"))

    @app.get("/api/state")
    def state():
        return {"datasets": ws.datasets(), "presets": presets(), "runs": ws.runs.runs(), "training": ws.runs.status(),
                "quants": list(QUANTS), "heldout": str(bundled_path(HELDOUT_DATA)), "bundled": str(ws.bundled_data),
                "preference_heldout": str(bundled_path(PREFERENCE_HELDOUT_DATA)),
                "tasks": {kind: ws.tasks.get(kind) for kind in export.TASKS}}

    def presets() -> dict:
        found = {}
        for path in config_files():
            c = load_config(path)
            found[path.stem] = {"path": str(path), "model": c.model.name_or_path, "epochs": c.train.epochs,
                                "learning_rate": c.train.learning_rate, "r": c.lora.r, "val_size": c.data.val_size,
                                "max_samples": c.data.max_samples}
        return found

    for router in (data.router, runs.router, chat.router, export.router, files.router):
        app.include_router(router)
    return app


__all__ = ["create_app", "field_label", "field_problem", "LANG_COOKIE", "PAGE_TOKEN_HEADER", "TOKEN_COOKIE"]

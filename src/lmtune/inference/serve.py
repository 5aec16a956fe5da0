"""An OpenAI-compatible HTTP server for a tuned model: any OpenAI client works by changing its base URL.

Endpoints: GET /health, GET /v1/models, POST /v1/completions (raw text continuation, as OpenAI
defines it), POST /v1/chat/completions (messages rendered with the template the model was trained
with, `PromptTemplate.conversation_ids`). Requests are turned into rows for the `BatchWorker`, which
generates rows that arrive together as one left-padded batch.

Every bad request gets OpenAI's error shape {"error": {"message", "type", "param", "code"}} with a
4xx status; messages never hold file paths or tracebacks.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..config import GenerateConfig
from ..data.normalize import nfc
from ..errors import DataError
from ..webguard import HostGuard, bind, is_loopback, key_matches  # noqa: F401 - bind: the command takes the port with it
from .batching import BatchWorker, Row, context_length
from .load import LoadedModel

MAX_BODY_BYTES = 1 << 20  # a whole context of text is far below this; more is a mistake or an attack
MAX_N = 16  # choices per request; each is a batch row
MAX_STOP = 4  # as OpenAI


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error"}


def _shown(name: str) -> str:
    """A model name a client sent, quoted for an error message, unless it looks like a file path: error
    messages never hold paths, not even ones the client typed (they may be probing the disk)."""
    looks_like_path = name.startswith(("/", "~", ".")) or "\\" in name or name.count("/") > 1 or ":" in name
    return "you asked for" if looks_like_path or len(name) > 200 else repr(name)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None) -> dict:
    type = type or _ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------- request bodies
# Strict: "max_tokens": "5" or true is a wrong type (400), not something to coerce.


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    # torch.Generator.manual_seed takes 64 bits; seed + k is the seed of choice k (Service.rows), so the top of the
    # range leaves room for MAX_N choices: anything larger is a 400 naming `seed`, not an overflow in the batch.
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    logprobs: Any = None  # refused unless null or 0 (Service.check_logprobs): lmtune does not compute them


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: Any = None  # refused unless null or false (Service.check_logprobs): lmtune does not compute them
    top_logprobs: Any = None
    # Refused unless absent or empty (Service.check_unsupported): accepting and ignoring them would answer something
    # other than what the client asked for.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logit_bias: Any = None
    response_format: Any = None


# OpenAI chat parameters lmtune serve does not implement -> what they ask for, for the refusal
UNSUPPORTED = {"tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
               "function_call": "function calling", "logit_bias": "token biases",
               "response_format": "structured output (only {\"type\": \"text\"})"}


def joined_turns(messages: list[dict]) -> list[dict]:
    """Consecutive messages of one role as one message, their texts separated by a blank line: OpenAI accepts two user
    messages in a row, and the chat templates lmtune trains with alternate user and assistant."""
    joined: list[dict] = []
    for message in messages:
        if joined and joined[-1]["role"] == message["role"]:
            joined[-1] = {**joined[-1], "content": joined[-1]["content"] + "\n\n" + message["content"]}
        else:
            joined.append(dict(message))
    return joined


# ---------------------------------------------------------------- the service behind the routes


class Service:
    """Turns validated requests into batch rows and collects what the worker emits."""

    def __init__(self, loaded: LoadedModel, worker: BatchWorker, model_id: str, defaults: GenerateConfig):
        self.loaded, self.worker, self.model_id, self.defaults = loaded, worker, model_id, defaults
        self.context = context_length(loaded)
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.model_id:  # 404, as OpenAI answers a model that does not exist (with its type and code)
            raise APIError(404, f"The model {_shown(name)} does not exist; this server serves '{self.model_id}'", "model",
                           "model_not_found", type="invalid_request_error")

    @staticmethod
    def check_unsupported(request: ChatRequest) -> None:
        for name, what in UNSUPPORTED.items():
            value = getattr(request, name)
            if name == "response_format" and value in ({"type": "text"},):
                continue
            if value not in (None, [], {}, "none"):
                raise APIError(400, f"{name} is not supported by lmtune serve ({what}); leave it out", name,
                               "unsupported_parameter")

    @staticmethod
    def check_logprobs(request: _Sampling) -> None:
        """Log probabilities are not computed: a client that asks for them is told so, instead of getting null."""
        for name in ("logprobs", "top_logprobs"):
            value = getattr(request, name, None)
            if value not in (None, False, 0) or (name == "top_logprobs" and value == 0):
                raise APIError(400, f"{name} is not supported by lmtune serve (log probabilities are not computed); "
                                    f"leave it out or set it to null", name, "unsupported_parameter")

    def stops(self, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings", "stop")
        return stops

    def max_tokens(self, requested: int | None, prompt_length: int) -> int:
        room = self.context - prompt_length
        if room < 1:
            raise APIError(400, f"the prompt is {prompt_length} tokens; this model's context is {self.context} tokens", "messages",
                           "context_length_exceeded")
        if requested is None:
            return min(self.defaults.max_new_tokens, room)
        if requested > room:
            raise APIError(400, f"max_tokens is {requested}, but the prompt ({prompt_length} tokens) leaves room for only {room} "
                           f"in this model's context of {self.context} tokens", "max_tokens", "context_length_exceeded")
        return requested

    def rows(self, request: _Sampling, prompts: list[list[int]], max_tokens: int | None, strip: bool, emit_for) -> list[Row]:
        """n rows per prompt; row k of the result is choice k. Unset fields take the server's generate settings."""
        temperature = request.temperature
        if temperature is None:
            temperature = 0.0 if self.defaults.greedy else self.defaults.temperature
        top_p = request.top_p if request.top_p is not None else self.defaults.top_p
        stops = self.stops(request.stop)
        rows = []
        for prompt in prompts:
            limit = self.max_tokens(max_tokens, len(prompt))
            for j in range(request.n):
                rows.append(Row(prompt, limit, emit_for(len(rows)), temperature=temperature, top_p=top_p,
                                top_k=self.defaults.top_k, repetition_penalty=self.defaults.repetition_penalty, stop=stops,
                                seed=None if request.seed is None else request.seed + j, strip=strip))
        return rows


def _events(loop: asyncio.AbstractEventLoop, q: asyncio.Queue):
    """emit() factory: the worker thread hands (choice index, text, finish reason) to this request's event loop."""

    def emit_for(index: int):
        def emit(text: str, finish: str | None) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, (index, text, finish))
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass
        return emit

    return emit_for


DISCONNECT_CHECK_SECONDS = 0.5


class _Listener:
    """The worker's events for one request, and whether its client is still there.

    The client is looked for every DISCONNECT_CHECK_SECONDS whether or not events arrive: a non-streaming
    client that gave up (a client timeout) is noticed while its answer is still being generated, not only
    when generation pauses; Starlette tells a streaming response's generator itself."""

    def __init__(self, q: asyncio.Queue, request):
        self.q, self.request = q, request
        self.checked = time.monotonic()

    async def next(self) -> tuple[int, str, str | None] | None:
        """The next event, or None once the client has gone."""
        while True:
            if time.monotonic() - self.checked >= DISCONNECT_CHECK_SECONDS:
                self.checked = time.monotonic()
                if await self.request.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(self.q.get(), timeout=DISCONNECT_CHECK_SECONDS)
            except asyncio.TimeoutError:
                pass


def _usage(prompts: list[list[int]], rows: list[Row]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(r.ids) for r in rows)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _finish_reason(reason: str | None) -> str | None:
    return "stop" if reason == "cancelled" else reason


# ---------------------------------------------------------------- one generation, whole or streamed


async def _generate(service: Service, request, body: _Sampling, prompts: list[list[int]], max_tokens: int | None,
                    strip: bool, kind: str) -> Any:
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    rows = service.rows(body, prompts, max_tokens, strip, _events(loop, q))
    for row in rows:
        service.worker.submit(row)
    meta = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": service.model_id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(q, rows, request, meta, kind, prompts, include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _collect(q, rows, request, meta, kind, prompts)


async def _collect(q: asyncio.Queue, rows: list[Row], request, meta: dict, kind: str, prompts: list[list[int]]) -> dict:
    texts = [""] * len(rows)
    reasons: list[str | None] = [None] * len(rows)
    listener = _Listener(q, request)
    try:
        while any(r is None for r in reasons):
            event = await listener.next()
            if event is None:
                return {}  # nobody is listening; the finally clause frees the rows
            index, text, finish = event
            texts[index] += text
            reasons[index] = finish or reasons[index]
    finally:
        for row in rows:
            row.cancelled.set()  # no effect on finished rows; stops the others
    if "error" in reasons:
        raise APIError(500, "generation failed; see the server log")
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": _finish_reason(reasons[i])} for i, t in enumerate(texts)]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(prompts, rows)}
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": _finish_reason(reasons[i])} for i, t in enumerate(texts)]
    return {**meta, "object": "text_completion", "choices": choices, "usage": _usage(prompts, rows)}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _chunk(meta: dict, kind: str, index: int, text: str | None, finish: str | None) -> dict:
    if kind == "chat":
        delta = {} if text is None else {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**meta, "object": "chat.completion.chunk", "choices": [choice]}
    return {**meta, "object": "text_completion", "choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}]}


async def _stream(q: asyncio.Queue, rows: list[Row], request, meta: dict, kind: str, prompts: list[list[int]],
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.

    If the client disconnects, Starlette cancels this generator (or the listener notices), and the
    finally clause marks the rows cancelled so the worker stops generating them at the next step.
    """
    try:
        if kind == "chat":
            for index in range(len(rows)):
                yield _sse({**_chunk(meta, kind, index, "", None), "choices": [
                    {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
        remaining = len(rows)
        listener = _Listener(q, request)
        while remaining:
            event = await listener.next()
            if event is None:
                return
            index, text, finish = event
            if finish == "error":
                yield _sse(error_body(500, "generation failed; see the server log"))
                return
            if text:
                yield _sse(_chunk(meta, kind, index, text, None))
            if finish:
                remaining -= 1
                yield _sse(_chunk(meta, kind, index, None, _finish_reason(finish)))
        if include_usage:
            yield _sse({**meta, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                        "choices": [], "usage": _usage(prompts, rows)})
        yield "data: [DONE]\n\n"
    finally:
        for row in rows:
            row.cancelled.set()


# ---------------------------------------------------------------- guard: API key and body size, before any parsing


class Guard:
    """ASGI middleware: 401 without the right key on /v1/*, 413 for bodies over the limit.

    It runs before FastAPI reads the body, so an oversized body is never buffered whole and an
    unauthenticated client learns nothing about request validation.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.expected and scope["path"].startswith("/v1"):
            if not key_matches(headers.get(b"authorization"), self.expected):
                return await _send_error(send, 401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'", "invalid_api_key")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            return await _send_error(send, 400, "Content-Length is not a number")
        if int(declared) > self.max_body_bytes:
            return await _send_error(send, 413, f"The request body is larger than {self.max_body_bytes} bytes")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body = await _read_body(receive, self.max_body_bytes)
        if body is None:
            return await _send_error(send, 413, f"The request body is larger than {self.max_body_bytes} bytes")
        return await self.app(scope, _replay(body, receive), send)


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` (chunked bodies declare no length)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)
        size += len(message.get("body", b""))
        if size > limit:
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: the real channel, which reports a disconnect

    return replayed


async def _send_error(send, status: int, message: str, code: str | None = None) -> None:
    payload = json.dumps(error_body(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# ---------------------------------------------------------------- the app


# Fields that take one of two shapes: what to say instead of pydantic's one message per shape tried
# ("messages.0.content.str: Input should be a valid string").
_UNION_FIELDS = {"content": "a string or a list of text parts ({\"type\": \"text\", \"text\": \"...\"})",
                 "stop": "a string or a list of strings", "prompt": "a string or a list of strings"}


def _is_union_tag(part) -> bool:
    """A location part pydantic adds for the shape of a union it tried ('str', 'list[TextPart]'), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or "-" in part)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One message for the first problem of a request body, in the client's terms: the field's path, what it must
    be, and what was sent when that was null."""
    error = errors[0]
    if error.get("type") == "json_invalid":
        return "The request body is not valid JSON", None
    raw = [part for part in error.get("loc", ()) if part != "body"]
    if not raw:
        return "The request body must be a JSON object, sent with 'Content-Type: application/json'", None
    tag = next((i for i, part in enumerate(raw) if _is_union_tag(part)), None)
    if tag is not None:
        field_path = raw[:tag]
        # A list that was the right shape but held a bad item: that item's problem says more than "wrong type".
        inside = [[p for p in e.get("loc", ()) if p != "body"] for e in errors]
        inside = [loc for loc in inside if len(loc) > tag + 1 and loc[:tag] == field_path]
        value = error.get("input")
        if isinstance(value, list) and inside:
            error = errors[[[p for p in e.get("loc", ()) if p != "body"] for e in errors].index(inside[0])]
            raw = [part for part in inside[0] if not _is_union_tag(part)]
        else:
            path = ".".join(map(str, field_path))
            expected = _UNION_FIELDS.get(str(field_path[-1]), "of another type")
            got = "null" if value is None else {bool: "true/false", int: "a number", float: "a number", str: "text",
                                                 dict: "an object", list: "a list"}.get(type(value), "another type")
            return f"{path}: must be {expected}, got {got}", str(field_path[0])
    path = ".".join(map(str, raw))
    message = error.get("msg", "invalid value")
    if error.get("input", "") is None and error.get("type") != "missing":
        message += ", got null"
    return f"{path}: {message}", str(raw[0])


def _foreign_host(_scope, given: str) -> dict:
    return error_body(403, "This server answers requests addressed to the names it listens on (127.0.0.1, localhost, "
                           "[::1] or its --host), not to the Host this request names", code="host_not_allowed",
                      type="permission_error")


def create_app(loaded: LoadedModel, worker: BatchWorker, model_id: str, defaults: GenerateConfig | None = None,
               api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, host: str = "127.0.0.1"):
    """The server's ASGI app. `host`: the address it listens on; requests naming another Host are refused
    (webguard.HostGuard: a web page on a domain made to resolve to this machine must not reach the model)."""
    service = Service(loaded, worker, model_id, defaults or GenerateConfig())
    app = FastAPI(title="lmtune", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(error_body(e.status, e.message, e.param, e.code, e.type), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, e: RequestValidationError):
        message, param = _validation_message(list(e.errors()) or [{}])
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        message = "Not found" if e.status_code == 404 else str(e.detail)
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal(_, e: Exception):  # logged by uvicorn on the server side; the client gets no details
        return JSONResponse(error_body(500, "internal server error"), status_code=500)

    @app.get("/health")
    async def health():
        # cancelled_rows: answers stopped because their client left (a soak test checks they stop, not run on)
        return {"status": "ok", "model": model_id, "queued_rows": worker.queue.qsize(), "busy_rows": worker.busy_rows,
                "cancelled_rows": getattr(worker, "cancelled_rows", 0)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": service.created, "owned_by": "lmtune"}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise APIError(404, f"The model {_shown(name)} does not exist", "model", "model_not_found")
        return {"id": model_id, "object": "model", "created": service.created, "owned_by": "lmtune"}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        service.check_model(body.model)
        service.check_logprobs(body)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise APIError(400, "prompt must not be an empty list", "prompt")
        tokenizer = loaded.tokenizer
        # Raw text, as OpenAI's completions define it, but in NFC as every other prompt (data.template, data.normalize).
        prompts = [tokenizer(nfc(t))["input_ids"] for t in texts]
        if any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty", "prompt")
        return await _generate(service, request, body, prompts, body.max_tokens, strip=False, kind="text")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        service.check_model(body.model)
        service.check_logprobs(body)
        service.check_unsupported(body)
        messages = joined_turns([{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                 for m in body.messages])
        try:
            prompt = loaded.template.conversation_ids(loaded.tokenizer, messages)
        except DataError as e:
            raise APIError(400, str(e), "messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _generate(service, request, body, [prompt], max_tokens, strip=True, kind="chat")

    return HostGuard(Guard(app, api_key, max_body_bytes), host, _foreign_host)


# ---------------------------------------------------------------- running it


def model_id_for(model: str | None, adapter: str | None) -> str:
    """The name clients use: the folder's name, never its full path."""
    name = adapter or model or "model"
    if name.startswith("pypi:"):
        return name[len("pypi:") :].split("/")[0]
    if Path(name).exists():
        return Path(name).resolve().name
    return name  # a hub id such as bigscience/bloom-560m


API_KEY_VARIABLE = "LMTUNE_API_KEY"


def banner(host: str, port: int, model_id: str, api_key: str | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    auth = ""
    if api_key:
        # $LMTUNE_API_KEY only where it is set to this key; else a placeholder (the key itself is never printed).
        from_env = os.environ.get(API_KEY_VARIABLE) == api_key
        auth = f' -H "Authorization: Bearer {"$" + API_KEY_VARIABLE if from_env else "<your --api-key>"}"'
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Học máy là gì?"}]}, ensure_ascii=False)
    lines = [f"lmtune serve: model '{model_id}' at {url}/v1 (OpenAI-compatible; Ctrl-C stops)",
             f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"]
    if not is_loopback(host) and not api_key:
        lines.append("  warning: listening beyond this machine without --api-key; anyone who can reach it can use it")
    return "\n".join(lines)


def serve(loaded: LoadedModel, model_id: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch_size: int = 8, defaults: GenerateConfig | None = None, sock: socket.socket | None = None) -> None:
    """Run until Ctrl-C. `sock`: already bound by `bind` (the command binds before loading the model, so that a port
    in use is reported at once); else `host` and `port` are bound here."""
    import uvicorn

    sock = sock or bind(host, port)
    worker = BatchWorker(loaded, max_batch_size).start()
    app = create_app(loaded, worker, model_id, defaults, api_key, host=host)
    print(banner(host, sock.getsockname()[1], model_id, api_key), flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then re-raises it; stopping is the normal end
        pass
    finally:
        worker.stop()
        print("lmtune serve: stopped", file=sys.stderr)

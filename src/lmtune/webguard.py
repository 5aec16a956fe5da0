"""What lmtune's two HTTP servers (`lmtune serve`, `lmtune ui`) share: taking the address, knowing which
addresses are this machine only, comparing keys, refusing requests meant for another host, and the one-line
message a person sees for an lmtune error (the CLI prints the same lines).

Why a Host check at all: a server on 127.0.0.1 is reachable from the browser of the person running it, so any
web page they visit can send it requests. A page on a domain the attacker makes resolve to 127.0.0.1 (DNS
rebinding) is even same-origin with the server as far as the browser knows, and can read its answers. What the
browser cannot forge is the Host header: it names the attacker's domain. So a request is served only when its
Host is a name the server was started on (the loopback names, the chosen --host, or, for a wildcard address, an
IP address literal, which no DNS answer can stand behind).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from urllib.parse import urlsplit

from .config import ConfigError
from .errors import LmtuneError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    """Whether an address reaches this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """Bind and listen before printing, so the printed URL is one that already accepts connections (port 0 = any
    free one): a client that connects before the server loop runs waits in the backlog instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's default backlog
    except OSError:
        sock.close()
        raise
    return sock


def key_matches(given: str | bytes | None, expected: str | bytes) -> bool:
    """Constant-time comparison, so the time of a refusal tells nothing about how much of a key was right."""
    as_bytes = (lambda s: s.encode() if isinstance(s, str) else s)
    return hmac.compare_digest(as_bytes(given or b""), as_bytes(expected))


def person_message(error: BaseException) -> str:
    """What lmtune prints for an error: one `error: ...` line per problem; anything else is a bug of lmtune, named
    by its type and first line (never a traceback, which goes to the console)."""
    if isinstance(error, ConfigError):
        return "\n".join(f"error: {problem}" for problem in error.problems)
    if isinstance(error, LmtuneError):
        return f"error: {error}"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"internal error: {type(error).__name__}: {first}"


def _split_host(value: str) -> tuple[str, int | None] | None:
    """'127.0.0.1:7860' -> ('127.0.0.1', 7860), '[::1]:80' -> ('::1', 80), 'localhost' -> ('localhost', None);
    None when it is not a host at all."""
    try:
        parts = urlsplit("//" + value)
        return (parts.hostname or "").lower(), parts.port
    except ValueError:  # a port that is not a number, a bracket left open
        return None


class HostCheck:
    """The Host names a server started on `host` answers to; see the module's docstring for why."""

    def __init__(self, host: str):
        self.host = host.strip("[]").lower()
        self.names = set(LOOPBACK_NAMES)
        if self.host not in WILDCARDS:
            self.names.add(self.host)
        self.any_address = self.host in WILDCARDS

    def _name_allowed(self, name: str) -> bool:
        if name in self.names:
            return True
        if self.any_address:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    def allows(self, host_header: str | None, port: int | None) -> bool:
        """Whether a request with this Host header, arriving on `port` (None: unknown), is meant for this server."""
        if host_header is None:
            # Only a client of HTTP/1.0 leaves Host out; a browser always sends it, so no web page is behind it.
            return True
        split = _split_host(host_header)
        if split is None or not self._name_allowed(split[0]):
            return False
        return port is None or (split[1] or 80) == port

    def allows_origin(self, origin: str | None, port: int | None) -> bool:
        """Whether an Origin header is this server's own page (http://<allowed host>:<port>)."""
        if not origin or origin == "null":
            return False
        parts = urlsplit(origin)
        return parts.scheme == "http" and self.allows(parts.netloc, port)


def server_port(scope: dict) -> int | None:
    """The port a request arrived on (the listening socket's, as the ASGI server reports it)."""
    server = scope.get("server")
    return int(server[1]) if server and server[1] is not None else None


def header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def send_json(send, status: int, payload: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class HostGuard:
    """ASGI middleware: a request whose Host is not one of this server's names gets `refuse(host)` as a 403
    before anything else runs (a page, a file, an API call)."""

    def __init__(self, app, host: str, refuse):
        self.app, self.check, self.refuse = app, HostCheck(host), refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            given = header(scope, b"host")
            if not self.check.allows(given, server_port(scope)):
                return await send_json(send, 403, self.refuse(scope, given or ""))
        return await self.app(scope, receive, send)

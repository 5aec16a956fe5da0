"""Run the web UI: the access token off loopback, the address taken before the banner, and a graceful stop of
training at exit."""

from __future__ import annotations

import secrets

from ..errors import LmtuneError
from ..webguard import bind, is_loopback
from .app import create_app


def access_token(host: str, api_key: str | None) -> tuple[str | None, bool]:
    """(token the page requires, whether it was made up now). This machine only (loopback): none. Reachable from
    other machines: the --api-key, else a random token printed once, so nobody on the network can train or read
    files through the page without it."""
    if api_key:
        return api_key, False
    if is_loopback(host):
        return None, False
    return secrets.token_urlsafe(18), True


def run_ui(host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None, workdir: str = "runs/ui",
           model_dirs: tuple[str, ...] = ()) -> None:
    import uvicorn

    token, generated = access_token(host, api_key)
    app = create_app(workdir, token, host=host, model_dirs=model_dirs)
    try:
        sock = bind(host, port)
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        raise LmtuneError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{sock.getsockname()[1]}/"
    print(f"lmtune ui: open {url}{'?token=' + token if token else ''} in a browser (Ctrl-C stops it; a running "
          f"training is stopped with a checkpoint, and can be resumed)", flush=True)
    if generated:
        print(f"lmtune ui: {host} is reachable from other machines, so the page asks for this one-time token "
              f"(or start with --api-key KEY): {token}", flush=True)
    print(f"lmtune ui: files go to {app.state.ui.workdir}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:
        server.run(sockets=[sock])
    finally:
        app.state.ui.runs.shutdown()

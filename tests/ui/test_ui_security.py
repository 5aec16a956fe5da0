"""Who can drive `lmtune ui`: real HTTP requests to a server on a loopback port, with the Host, Origin and
Sec-Fetch-Site headers another site's page (or a DNS-rebinding page) would send, and a real Chromium page of
another origin that tries to write through the UI. docs/guarantees.md lists these promises with these tests."""

from __future__ import annotations

import http.client
import http.server
import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from lmtune.ui.app import create_app
from lmtune.webguard import bind

from conftest import QA, write_jsonl


class LiveUI:
    """The UI's app under uvicorn on a free loopback port, asked with raw http.client so every header is ours."""

    def __init__(self, app):
        import uvicorn

        self.app, self.ws = app, app.state.ui
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the UI did not start"
            time.sleep(0.02)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | dict | None = None, host: str | None = None,
                headers: dict | None = None) -> tuple[int, str]:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host or f"127.0.0.1:{self.port}")
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body or b"")))
        connection.endheaders(body or b"")
        response = connection.getresponse()
        text = response.read().decode("utf-8", "replace")
        connection.close()
        return response.status, text

    def page_token(self) -> str:
        """The token as the page gets it: from the HTML the UI serves."""
        status, html = self.request("GET", "/")
        assert status == 200
        return json.loads(re.search(r"window\.BOOT = (\{.*?\});</script>", html, re.S).group(1))["token"]

    def page_headers(self) -> dict:
        return {"X-Lmtune-Token": self.page_token(), "Origin": self.origin, "Sec-Fetch-Site": "same-origin"}

    def stop(self):
        self.ws.runs.shutdown()
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def live(tmp_path):
    ui = LiveUI(create_app(tmp_path / "ui", max_uploads_bytes=5000))
    yield ui
    ui.stop()


def _uploads(ui: LiveUI) -> list[str]:
    return sorted(p.name for p in ui.ws.folders["uploads"].iterdir())


# ---------------------------------------------------------------- Host: no DNS rebinding


def test_a_request_for_another_host_name_gets_nothing(live):
    export = live.ws.folders["exports"] / "r" / "r-q8_0.gguf"
    export.parent.mkdir(parents=True)
    export.write_bytes(b"GGUF" + b"\0" * 60)
    token = live.page_token()
    asks = [("GET", "/", None), ("GET", "/api/state", None), ("GET", "/download/exports/r/r-q8_0.gguf", None),
            ("POST", "/api/inspect", {"paths": [str(live.ws.bundled_data)]}),
            ("POST", "/api/train/start", {"paths": [str(live.ws.bundled_data)], "max_samples": 4})]
    for host in ("evil.example", "attacker.localhost.evil.example", "127.0.0.1.nip.io"):
        name = f"{host}:{live.port}"
        for method, path, body in asks:
            status, text = live.request(method, path, body, host=name,
                                        headers={"X-Lmtune-Token": token, "Origin": f"http://{name}"})
            assert status == 403, (host, path, text)
            assert "datasets" not in text and token not in text and "GGUF" not in text
    assert live.ws.runs.runs() == []  # no training was started
    for host in ("127.0.0.1", "localhost", "[::1]", "LOCALHOST"):
        assert live.request("GET", "/api/state", host=f"{host}:{live.port}")[0] == 200, host
        assert live.request("GET", "/download/exports/r/r-q8_0.gguf", host=f"{host}:{live.port}")[0] == 200
    assert live.request("GET", "/", host=f"127.0.0.1:{live.port + 1}")[0] == 403  # another port: not this server


def test_a_ui_started_on_another_address_also_answers_that_name(tmp_path):
    from fastapi.testclient import TestClient

    app = create_app(tmp_path / "ui", token="k", host="192.168.7.9")
    client = TestClient(app, base_url="http://192.168.7.9:7860", headers={"Authorization": "Bearer k"})
    assert client.get("/api/state").status_code == 200
    assert client.get("/api/state", headers={"Host": "evil.example:7860"}).status_code == 403
    wildcard = TestClient(create_app(tmp_path / "ui", token="k", host="0.0.0.0"), base_url="http://10.1.2.3:7860",
                          headers={"Authorization": "Bearer k"})
    assert wildcard.get("/api/state").status_code == 200  # any address literal: no DNS answer stands behind it
    assert wildcard.get("/api/state", headers={"Host": "evil.example:7860"}).status_code == 403


# ---------------------------------------------------------------- writes only from the UI's own page


def test_writes_need_the_pages_token_and_origin(live):
    good = live.page_headers()
    refused = {
        "no token": {k: v for k, v in good.items() if k != "X-Lmtune-Token"},
        "a guessed token": {**good, "X-Lmtune-Token": "guess"},
        "another origin": {**good, "Origin": "http://evil.example"},
        "another port": {**good, "Origin": f"http://127.0.0.1:{live.port + 1}"},
        "an opaque origin": {**good, "Origin": "null"},
        "cross-site fetch": {**good, "Sec-Fetch-Site": "cross-site"},
        "same-site fetch": {**good, "Sec-Fetch-Site": "same-site"},
    }
    for why, headers in refused.items():
        status, text = live.request("POST", "/api/upload?name=x.jsonl", b'{"question": "a", "answer": "b"}\n',
                                    headers=headers)
        assert status == 403 and "not come from the lmtune page" in text, why
        status, text = live.request("POST", "/api/train/stop", b"", headers=headers)
        assert status == 403, why  # refused before it is even looked at: not "no training is running"
        status, _ = live.request("POST", "/api/inspect", {"paths": [str(live.ws.bundled_data)]}, headers=headers)
        assert status == 403, why
    assert _uploads(live) == []
    # the page itself (token, its own origin), and a client that sends no Origin at all (curl with the token)
    assert live.request("POST", "/api/upload?name=x.jsonl", b'{"question": "a", "answer": "b"}\n', headers=good)[0] == 200
    no_origin = {"X-Lmtune-Token": good["X-Lmtune-Token"]}
    assert live.request("POST", "/api/train/stop", b"", headers=no_origin)[0] == 400  # looked at: nothing to stop
    assert _uploads(live) == ["x.jsonl"]
    # reading from another site's page is refused too (a browser says where a request comes from)
    assert live.request("GET", "/api/state", headers={"Sec-Fetch-Site": "cross-site"})[0] == 403


def test_uploads_are_bounded_in_total_not_only_per_file(live):
    headers = live.page_headers()
    answers = [live.request("POST", f"/api/upload?name=big{i}.jsonl", b"x" * 2000, headers=headers) for i in range(4)]
    assert [status for status, _ in answers] == [200, 200, 413, 413]
    assert "more than 4.88 kB in all" in answers[2][1]
    assert _uploads(live) == ["big0.jsonl", "big1.jsonl"]  # nothing half-written is left behind
    assert sum(p.stat().st_size for p in live.ws.folders["uploads"].iterdir()) <= 5000


# ---------------------------------------------------------------- no folder listed to a web client


def test_a_model_path_from_the_page_lists_nothing_on_disk(live, tmp_path):
    private = tmp_path / "private"
    private.mkdir()
    (private / "secret-notes.txt").write_text("x")
    (private / "id_rsa").write_text("x")
    headers = live.page_headers()
    data = str(live.ws.bundled_data)
    for model in (str(Path.home()), "/etc", str(private), "~", "../../..", str(private / "nothing-here"),
                  f"{private}/model.gguf"):
        status, text = live.request("POST", "/api/inspect", {"paths": [data], "model": model}, headers=headers)
        assert status == 400, (model, text)
        message = json.loads(text)["error"]
        assert "not a model this page offers" in message
        for listed in ("secret-notes", "id_rsa", "passwd", "hosts", ".bashrc", "holds"):
            assert listed not in message, (model, message)


def test_a_folder_offered_at_start_is_a_model_the_page_may_name(tmp_path, tiny_llama_dir):
    empty = tmp_path / "models" / "not-a-model"
    empty.mkdir(parents=True)
    (empty / "secret-notes.txt").write_text("x")
    ui = LiveUI(create_app(tmp_path / "ui", model_dirs=(tiny_llama_dir, tmp_path / "models")))
    try:
        headers, data = ui.page_headers(), str(ui.ws.bundled_data)
        status, text = ui.request("POST", "/api/inspect", {"paths": [data], "model": tiny_llama_dir}, headers=headers)
        assert status == 200 and json.loads(text)["tokens"]["lengths"], text
        status, text = ui.request("POST", "/api/inspect", {"paths": [data], "model": str(empty)}, headers=headers)
        assert status == 400 and "not a model" in text and "secret-notes" not in text
    finally:
        ui.stop()


# ---------------------------------------------------------------- bad fields: 400 naming the field


BAD_FIELDS = {
    "chat messages as text": ("/api/chat", {"run": "r", "messages": "abc"}, "messages", "must be a list"),
    "chat message without content": ("/api/chat", {"run": "r", "messages": [{"role": "user"}]}, "messages.0.content",
                                     "is missing"),
    "chat turns out of order": ("/api/chat", {"run": "r", "messages": [{"role": "assistant", "content": "a"}]},
                                "messages", "must alternate"),
    "chat max_new_tokens negative": ("/api/chat", {"run": "r", "messages": [{"role": "user", "content": "a"}],
                                                   "max_new_tokens": -5}, "max_new_tokens", "at least 1"),
    "inspect max_length as text": ("/api/inspect", {"paths": [], "max_length": "abc"}, "max_length", "whole number"),
    "inspect max_length too small": ("/api/inspect", {"paths": [], "max_length": 1}, "max_length", "at least 2"),
    "evaluate max_new_tokens as text": ("/api/evaluate", {"run": "r", "max_new_tokens": "x"}, "max_new_tokens",
                                        "whole number"),
    "evaluate max_new_tokens negative": ("/api/evaluate", {"run": "r", "max_new_tokens": -5}, "max_new_tokens",
                                         "at least 1"),
    "train epochs as text": ("/api/train/start", {"paths": [], "epochs": "many"}, "epochs", "must be a number"),
    "export quant unknown": ("/api/export", {"run": "r", "quant": "q2"}, "quant", "must be one of"),
    "paths not a list": ("/api/clean", {"paths": "a.jsonl"}, "paths", "must be a list"),
    "body not an object": ("/api/inspect", ["a"], "", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_a_bad_field_is_a_400_that_names_it(live, case, capfd):
    path, body, field, problem = BAD_FIELDS[case]
    raw = json.dumps(body).encode()
    status, text = live.request("POST", path, raw, headers={**live.page_headers(), "Content-Type": "application/json"})
    assert status == 400, text
    message = json.loads(text)["error"]
    assert f"({field})" in message or not field, message
    assert problem in message
    assert "Traceback" not in text and "Traceback" not in capfd.readouterr().err


def test_a_bad_field_is_named_in_the_pages_language(live):
    headers = {**live.page_headers(), "Accept-Language": "vi-VN,vi"}
    status, text = live.request("POST", "/api/inspect", {"paths": [], "max_length": "abc"}, headers=headers)
    assert status == 400 and json.loads(text)["error"] == "Độ dài tối đa (token) (max_length): phải là số nguyên"
    status, text = live.request("POST", "/api/evaluate", {"run": "r", "max_new_tokens": -5}, headers=headers)
    assert json.loads(text)["error"] == "Số token mới tối đa (max_new_tokens): phải ít nhất là 1"


# ---------------------------------------------------------------- a real page of another origin, in Chromium


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="headless Chromium is not installed: "
                                    "apt-get install chromium chromium-driver (scripts/setup.sh does it)")

HOSTILE_PAGE = """<!doctype html><meta charset=utf-8><title>waiting</title><script>
const ui = "http://127.0.0.1:%(port)d";
const body = JSON.stringify({paths: [%(data)s], max_samples: 4, name: "pwned"});
const tries = [
  fetch(ui + "/api/upload?name=pwned.jsonl", {mode: "no-cors", method: "POST", body: "x".repeat(100000)}),
  fetch(ui + "/api/train/start", {mode: "no-cors", method: "POST", headers: {"Content-Type": "text/plain"}, body}),
  fetch(ui + "/api/train/stop", {mode: "no-cors", method: "POST"}),
  fetch(ui + "/api/upload?name=pwned2.jsonl", {method: "POST", headers: {"X-Lmtune-Token": "guess"}, body: "x"}),
  fetch(ui + "/api/state").then((r) => r.text()).then((t) => { window.stolen = t; }),
];
Promise.allSettled(tries).then((results) => {
  window.outcomes = results.map((r) => r.status);
  document.title = "done";
});
</script>"""


@needs_chromium
def test_a_page_of_another_origin_in_chromium_changes_nothing(live, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(HOSTILE_PAGE % {"port": live.port, "data": json.dumps(str(live.ws.bundled_data))},
                                     encoding="utf-8")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(site), **k)  # noqa: E731
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-proxy-server",
                     # evil.example resolves to this machine, as a DNS-rebinding attacker's name would
                     "--host-resolver-rules=MAP evil.example 127.0.0.1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{other.server_address[1]}/index.html")
        WebDriverWait(driver, 30).until(lambda d: d.title == "done")
        assert driver.execute_script("return window.stolen") is None  # the browser kept the answer from the page
        time.sleep(0.5)  # let any request the browser did send be handled
        assert _uploads(live) == [] and live.ws.runs.runs() == []
        # The same UI reached under the attacker's name: refused, and the page token is not in what comes back.
        driver.get(f"http://evil.example:{live.port}/")
        assert "answers only requests addressed to the names it listens on" in driver.page_source
        assert live.page_token() not in driver.page_source
        driver.get(f"http://evil.example:{live.port}/api/state")
        assert "datasets" not in driver.page_source
    finally:
        driver.quit()
        other.shutdown()
    # the UI's own page in the same browser still works (the existing browser test drives all of it)
    assert live.request("POST", "/api/upload?name=ok.jsonl", Path(write_jsonl(tmp_path / "ok.jsonl", QA)).read_bytes(),
                        headers=live.page_headers())[0] == 200

"""The web UI in a real browser (headless Chromium driven by Selenium) on a tiny random model: the whole job
from upload to GGUF download, in Vietnamese then English, with a screenshot of each step in the test's folder.

Needs Debian's `chromium` and `chromium-driver` (scripts/setup.sh installs them for ./run-tests.sh) and selenium
(the test extra). The server runs in this process; training runs as the `lmtune train` subprocess it starts.
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from conftest import TRAIN_DATA, write_jsonl

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[test]'")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="headless Chromium is not installed: "
                                "apt-get install chromium chromium-driver (scripts/setup.sh does it)")

ROWS = 24  # with a validation share of 0.2: 19 training samples, 5 steps of 4 per epoch
EPOCHS = 30  # 150 steps of the tiny model: long enough to stop in the middle, about 15 s in all


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    import uvicorn

    from lmtune.ui.app import create_app

    # The tiny model's folder is offered as `lmtune ui --model-dir` offers it: the page may name no other folder.
    app = create_app(tmp_path_factory.mktemp("ui-workdir"), model_dirs=(tiny_llama_dir,))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    app.state.ui.runs.shutdown()
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                     "--disable-gpu"):
        options.add_argument(argument)
    # A browser that asks for Vietnamese first, as a Vietnamese student's does.
    options.add_experimental_option("prefs", {"intl.accept_languages": "vi-VN,vi,en-US,en",
                                              "download.default_directory": str(downloads)})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


class Page:
    """The page under test: waits, clicks and screenshots (numbered, in the test's folder)."""

    def __init__(self, driver, folder: Path):
        self.d, self.folder, self.shots = driver, folder, 0

    def find(self, css: str):
        return self.d.find_element(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.find(css).text

    def wait(self, condition, timeout: float = 30, what: str = ""):
        def check(_):
            try:
                return condition()
            except Exception:  # noqa: BLE001 - the element is being re-rendered: ask again
                return False

        try:
            return WebDriverWait(self.d, timeout, poll_frequency=0.2).until(check)
        except Exception:
            self.shot("timeout")
            raise AssertionError(f"timed out waiting for {what or condition}; error box: {self.error()!r}; "
                                 f"console: {self.text('#console')[-1500:]!r}") from None

    def click(self, css: str) -> None:
        self.find(css).click()

    def type(self, css: str, value) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(str(value))

    def tab(self, name: str) -> None:
        self.click(f'.tab[data-tab="{name}"]')

    def error(self) -> str:
        box = self.find("#error")
        return "" if "hidden" in box.get_attribute("class") else self.text("#error-text")

    def plot_points(self, kind: str = "train") -> int:
        return int(self.find("#loss-plot").get_attribute(f"data-{kind}-points"))

    def state(self) -> str:
        return self.find("#train-state").get_attribute("data-state")

    def shot(self, name: str) -> Path:
        self.shots += 1
        path = self.folder / f"{self.shots:02d}-{name}.png"
        self.d.save_screenshot(str(path))
        return path


@pytest.fixture
def page(browser, server, tmp_path):
    url, _ = server
    browser.get(url)
    page = Page(browser, tmp_path)
    page.wait(lambda: page.find("#datasets input"), what="the page to load")
    return page


def _qa_rows(n: int) -> list[dict]:
    import json

    lines = TRAIN_DATA.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def test_the_whole_job_in_the_browser(page, server, tiny_llama_dir, tmp_path):
    # ---- 1. Data, in Vietnamese because the browser asks for it
    assert page.find("html").get_attribute("lang") == "vi"
    assert page.text('.tab[data-tab="data"]') == "1. Dữ liệu"
    page.shot("data-vi")
    page.type("#inspect-model", tiny_llama_dir)  # the same model field as the training form
    data = write_jsonl(tmp_path / "hoi_dap.jsonl", _qa_rows(ROWS))
    page.find("#upload").send_keys(data)
    page.wait(lambda: f"{ROWS} dòng" in page.text("#inspect-summary"), what="the inspect report")
    assert page.find("#token-histogram").find_elements(By.CSS_SELECTOR, "rect")
    assert page.text("#checks")  # the table of checks with counts
    page.shot("inspect-report")
    page.click("#clean-btn")
    page.wait(lambda: page.text("#clean-summary"), what="the clean report")
    assert "hoi_dap.clean.jsonl" in page.text("#clean-summary")
    page.shot("clean")

    # ---- 2. Train: estimate, start, watch the plot grow, stop, resume, finish
    page.tab("train")
    assert page.find("#train-model").get_attribute("value") == tiny_llama_dir
    Select(page.find("#train-preset")).select_by_value("quickstart")
    page.type("#train-model", tiny_llama_dir)  # choosing a preset puts its own model back
    for css, value in (("#train-epochs", EPOCHS), ("#train-lr", 0.002), ("#train-r", 8), ("#train-val", 0.2),
                       ("#train-max-samples", 0), ("#train-name", "lan-chay-1")):
        page.type(css, value)
    page.click("#estimate-btn")
    page.wait(lambda: "bước tối ưu" in page.text("#estimate"), what="the dry-run estimate")
    assert f"{EPOCHS * 5} bước" in page.text("#estimate")
    page.shot("estimate")
    page.click("#start-btn")
    page.wait(lambda: page.plot_points() >= 3, timeout=60, what="the first loss points")
    first = page.plot_points()
    page.wait(lambda: page.plot_points() > first, what="the plot to gain points")
    assert page.text("#fig-step").endswith(f"/ {EPOCHS * 5}")
    page.shot("training")

    # one training at a time: a second start is refused with a message, the first goes on
    page.type("#train-name", "lan-chay-2")
    page.click("#start-btn")
    page.wait(lambda: "Đang có một lần huấn luyện chạy" in page.error(), what="the refusal of a second start")
    page.shot("second-start-refused")

    page.click("#stop-btn")
    page.wait(lambda: page.state() == "stopped", what="the graceful stop")
    stopped_at = page.plot_points()
    assert 0 < stopped_at < EPOCHS * 5
    assert "checkpoint" in page.text("#console")
    assert page.find("#resume-btn").is_enabled()
    page.shot("stopped")

    # leaving the page does not stop training; coming back shows it
    page.click("#resume-btn")
    page.wait(lambda: page.state() in ("running", "evaluating", "finished"), what="the resumed run")
    page.d.refresh()
    page.wait(lambda: page.find("#loss-plot") and page.plot_points() >= stopped_at, what="the run after a reload")
    page.tab("train")
    page.wait(lambda: page.state() == "finished", timeout=90, what="the end of training")
    assert page.plot_points() == EPOCHS * 5 and page.plot_points("val") >= 2
    page.shot("finished")

    # ---- 3. Try: the same question to the base and the tuned model, side by side
    page.tab("try")
    page.wait(lambda: Select(page.find("#try-run")).first_selected_option.get_attribute("value") == "lan-chay-1",
              what="the finished run in the list")
    page.type("#try-max", 12)
    page.type("#question", "Học máy là gì?")
    page.click("#ask-btn")
    for side in ("base", "tuned"):
        page.wait(lambda: page.find(f"#chat-{side} .msg.assistant:not(.waiting)").text.strip(), timeout=60,
                  what=f"the {side} model's answer")
    page.wait(lambda: page.find("#ask-btn").is_enabled(), what="both answers to end")
    page.wait(lambda: page.find("#report .report-table"), what="the run's validation report")
    page.shot("try-side-by-side")
    # `lmtune eval` of tuned vs base, from the page, on the uploaded questions
    Select(page.find("#eval-data")).select_by_visible_text("uploads/hoi_dap.jsonl")
    page.click("#evaluate-btn")
    page.wait(lambda: "tinh chỉnh so với gốc" in page.text("#report"), timeout=90, what="the evaluation against the base")
    assert len(page.d.find_elements(By.CSS_SELECTOR, "#report table.answers tr")) > ROWS  # per question, both reports

    # ---- 4. Export: GGUF + Modelfile, downloaded by the browser
    page.tab("export")
    page.click("#merge-btn")
    page.wait(lambda: "lmtune chat --model" in page.text("#merge-result"), timeout=60, what="the merge")
    Select(page.find("#quant")).select_by_value("q8_0")
    page.click("#export-btn")
    page.wait(lambda: page.find("#download-gguf"), timeout=90, what="the export")
    assert "ollama create" in page.text("#export-result")
    page.click("#download-gguf")
    downloads = page.d.downloads
    gguf = page.wait(lambda: next((p for p in downloads.glob("*.gguf")), None), what="the downloaded file")
    assert gguf.read_bytes()[:4] == b"GGUF"
    page.shot("export")

    # ---- the switch to English changes every text, and a reload keeps it
    page.click("#lang-en")
    assert page.text('.tab[data-tab="export"]') == "4. Export"
    assert page.find("html").get_attribute("lang") == "en"
    page.d.refresh()
    page.wait(lambda: page.text('.tab[data-tab="train"]') == "2. Train", what="English after a reload")
    page.tab("train")
    page.shot("train-en")
    page.click("#lang-vi")
    assert page.shots >= 10


def test_a_binary_upload_shows_the_error_in_the_page(page, tmp_path):
    page.tab("data")
    blob = tmp_path / "anh.jsonl"
    blob.write_bytes(bytes(range(256)) * 8)
    page.find("#upload").send_keys(str(blob))
    page.wait(lambda: page.error(), what="the error message")
    message = page.error()
    assert re.fullmatch(r"error: \S*anh.jsonl:\d+: not UTF-8 text \(byte 0x\w+\); save the file as UTF-8", message)
    assert "Traceback" not in page.d.page_source
    page.shot("binary-upload")


def test_length_advice_stops_at_the_models_context(page, tiny_llama_dir, tmp_path):
    # The tiny model reads 512 tokens; answers far longer than that cannot be fixed by a longer max length.
    rows = [{"question": f"Câu hỏi {i}?", "answer": "Trí tuệ nhân tạo học từ dữ liệu. " * 120} for i in range(6)]
    page.tab("data")
    page.type("#inspect-model", tiny_llama_dir)
    page.find("#upload").send_keys(write_jsonl(tmp_path / "dai.jsonl", rows))
    page.wait(lambda: page.find("#verdict") and "6 mẫu" in page.text("#verdict"), what="the length advice")
    advice = page.text("#verdict")
    assert "tối đa 512 token" in advice and "lmtune data clean --max-length 512" in advice
    assert "khoảng" not in advice  # not the advice to raise the max length past the context


def test_preference_tuning_in_the_browser(page, tiny_llama_dir, tmp_path):
    import json

    pairs = [json.loads(line) for line in (TRAIN_DATA.parent / "vi_ai_preferences.jsonl").read_text(encoding="utf-8")
             .splitlines()[:8]]
    page.tab("data")
    page.type("#inspect-model", tiny_llama_dir)
    page.find("#upload").send_keys(write_jsonl(tmp_path / "cap_uu_tien.jsonl", pairs + [pairs[0]]))
    page.wait(lambda: "Dữ liệu ưu tiên: 9 dòng" in page.text("#inspect-summary"), what="the preference report")
    assert "1" == page.text('#checks tr[data-problem="duplicate"] td.num')  # the repeated pair, with its line
    assert "cap_uu_tien.jsonl:9: as cap_uu_tien.jsonl:1" in page.text('#checks tr[data-problem="duplicate"]')
    page.shot("preference-report")

    page.tab("train")
    beta = page.find("#train-beta")
    method = Select(page.find("#train-method"))
    assert not beta.is_displayed()  # LoRA has no beta
    method.select_by_value("kto")
    assert beta.is_displayed() and not page.find("#train-loss-type").is_displayed()  # the loss type is DPO's
    method.select_by_value("dpo")
    Select(page.find("#train-loss-type")).select_by_value("sigmoid")
    page.type("#train-model", tiny_llama_dir)
    for css, value in (("#train-beta", 0.2), ("#train-epochs", 2), ("#train-lr", 0.002), ("#train-val", 0.25),
                       ("#train-max-samples", 0), ("#train-name", "dpo-trinh-duyet")):
        page.type(css, value)
    page.click("#start-btn")
    page.wait(lambda: page.text("#train-run") == "(dpo-trinh-duyet)" and page.state() == "finished", timeout=120,
              what="the end of the DPO run")
    accuracy = page.text('#rewards [data-figure="accuracy"]')
    assert re.fullmatch(r"Độ chính xác phần thưởng: \d+% \(kiểm định \d+%\)", accuracy), accuracy
    assert page.text('#rewards [data-figure="margin"]').startswith("Chênh lệch phần thưởng: ")
    page.shot("dpo-finished")
    # the DPO run's adapter can be continued by the next run
    options = [o.get_attribute("value") for o in Select(page.find("#train-init-adapter")).options]
    assert "dpo-trinh-duyet" in options and options[0] == ""
    method.select_by_value("lora")  # the form is kept for the next visit: leave it as the other tests expect it

    # Try: a run tuned on preferences is evaluated on pairs (the bundled held-out ones are suggested)
    page.tab("try")
    Select(page.find("#try-run")).select_by_value("dpo-trinh-duyet")
    assert Select(page.find("#eval-data")).first_selected_option.text == "các cặp ưu tiên kiểm tra có sẵn"
    Select(page.find("#eval-data")).select_by_visible_text("uploads/cap_uu_tien.jsonl")
    page.type("#try-max", 4)
    page.click("#evaluate-btn")
    page.wait(lambda: "9 cặp ưu tiên từ cap_uu_tien.jsonl" in page.text("#report"), timeout=90,
              what="the preference evaluation")
    assert "câu chosen có xác suất cao hơn %" in page.text("#report .report-table")
    evaluated = page.d.find_elements(By.CSS_SELECTOR, "#report table.answers")[0]  # then the run's validation pairs
    assert len(evaluated.find_elements(By.CSS_SELECTOR, "tr")) == 1 + 9
    page.shot("preference-eval")
    page.tab("train")

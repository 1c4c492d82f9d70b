"""`xiaolm serve` over real HTTP on loopback, called with the official `openai` client and by hand."""

from __future__ import annotations

import json
import logging
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai", reason="the API tests use the official client: pip install 'xiaolm[dev]'")
httpx = pytest.importorskip("httpx")

from xiaolm.checkpoint import LATEST_FILE  # noqa: E402
from xiaolm.inference.chat import chat_prompt_ids  # noqa: E402
from xiaolm.inference.engine import Engine, Request  # noqa: E402
from xiaolm.inference.sampling import SamplingConfig  # noqa: E402

from conftest import ROOT  # noqa: E402
from serve_helpers import run_server, serving_checkpoint  # noqa: E402

CHAT = [{"role": "system", "content": "你是小模型。"}, {"role": "user", "content": "你好，请介绍一下三国。"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    checkpoint = serving_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", tokenizer)
    with run_server(checkpoint, model_name="tiny", num_slots=4, max_tokens=64, max_messages=8,
                    max_body_bytes=20_000) as running:
        yield running


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def alone(served, prompt_ids, sampling, stops=()) -> tuple[str, Request]:
    """What the engine gives this request by itself: the reference for what the server returns."""
    tokenizer = served.server.tokenizer
    request = Request(prompt_ids, sampling, stop_ids=frozenset(tokenizer.stop_ids), stop_strings=stops)
    text = "".join(Engine(served.server.engine.model, tokenizer).stream(request))
    return text, request


def test_models_and_health(served, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].object == "model"
    assert client.models.retrieve("tiny").owned_by == "xiaolm"
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok" and health["auth_required"] is False and health["context_length"] == 256


def test_chat_completion_equals_the_engine_alone(served, client):
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0)
    prompt = chat_prompt_ids(served.server.tokenizer, CHAT)
    text, request = alone(served, prompt, SamplingConfig(max_new_tokens=24, temperature=0))
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == request.finish_reason
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == len(request.output_ids)
    assert reply.usage.total_tokens == len(prompt) + len(request.output_ids)


def test_streamed_chat_is_what_the_openai_api_sends(served, client):
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks[1:-2]]
    assert all(c.choices[0].finish_reason is None and c.choices[0].delta.content for c in content)
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert "".join(c.choices[0].delta.content for c in content) == whole.choices[0].message.content
    # the bytes on the wire: SSE events, the last one [DONE]
    raw = httpx.post(served.url + "/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 5,
                                                                "stream": True}).text
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[0][6:])  # only when stream_options asks for it


def test_completions_streamed_and_whole(served, client):
    whole = client.completions.create(model="tiny", prompt="三国时期，", max_tokens=16, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    tokenizer = served.server.tokenizer
    text, _ = alone(served, tokenizer.encode("三国时期，"), SamplingConfig(max_new_tokens=16, temperature=0))
    assert whole.choices[0].text == text
    chunks = list(client.completions.create(model="tiny", prompt="三国时期，", max_tokens=16, temperature=0,
                                            stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    by_ids = client.completions.create(model="tiny", prompt=tokenizer.encode("三国时期，"), max_tokens=16,
                                       temperature=0)
    assert by_ids.choices[0].text == text


def test_same_seed_same_text_and_settings_are_honoured(served, client):
    def sample(seed, **extra):
        return client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=1.0,
                                              top_p=0.9, seed=seed, **extra).choices[0].message.content

    assert sample(7) == sample(7) != sample(8)
    prompt = chat_prompt_ids(served.server.tokenizer, CHAT)
    penalised = SamplingConfig(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=7, presence_penalty=1.0,
                               frequency_penalty=0.5, top_k=40, repetition_penalty=1.2)
    expected, _ = alone(served, prompt, penalised)
    got = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0.8, top_p=0.9,
                                         seed=7, presence_penalty=1.0, frequency_penalty=0.5,
                                         extra_body={"top_k": 40, "repetition_penalty": 1.2})
    assert got.choices[0].message.content == expected


def test_stop_strings_cut_exactly_also_across_tokens(served, client):
    tokenizer = served.server.tokenizer
    prompt = tokenizer.encode("To be, or not to be")
    text, request = alone(served, prompt, SamplingConfig(max_new_tokens=40, temperature=0))
    pieces = [tokenizer.token_bytes()[t] for t in request.output_ids]
    boundary = len(pieces[0]) + len(pieces[1]) + len(pieces[2])
    stop = b"".join(pieces)[boundary - 1:boundary + 1].decode("utf-8", errors="ignore")  # spans two tokens
    assert stop and text.find(stop) >= 0
    cut = text[:text.find(stop)]
    whole = client.completions.create(model="tiny", prompt="To be, or not to be", max_tokens=40, temperature=0,
                                      stop=[stop, "never-there"])
    assert whole.choices[0].text == cut and whole.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="To be, or not to be", max_tokens=40,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_get_what_they_get_alone(served, client):
    # 10 clients at once on 4 slots: greedy and seeded, different prompts and lengths
    jobs = [dict(messages=[{"role": "user", "content": f"第{i}个问题：{'三国' * i}"}], max_tokens=8 + 3 * i,
                 temperature=0 if i % 2 else 0.9, seed=i) for i in range(10)]
    prompts = [chat_prompt_ids(served.server.tokenizer, job["messages"]) for job in jobs]
    expected = [alone(served, prompt, SamplingConfig(max_new_tokens=job["max_tokens"], temperature=job["temperature"],
                                                      seed=job["seed"]))[0] for prompt, job in zip(prompts, jobs)]
    barrier = threading.Barrier(len(jobs))

    def call(job):
        barrier.wait()
        if job["seed"] % 3 == 0:  # some stream, some not
            stream = client.chat.completions.create(model="tiny", stream=True, **job)
            return "".join(c.choices[0].delta.content or "" for c in stream)
        return client.chat.completions.create(model="tiny", **job).choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(call, jobs))
    assert got == expected


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body, status, param, code", [
    ({"model": "tiny", "messages": CHAT, "temperature": "hot"}, 400, "temperature", None),
    ({"model": "tiny", "messages": CHAT, "temperature": 3}, 400, "temperature", None),
    ({"model": "tiny", "messages": CHAT, "top_p": 0}, 400, "top_p", None),
    ({"model": "tiny", "messages": []}, 400, "messages", None),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", None),
    ({"model": "tiny", "messages": [{"role": "user"}]}, 400, "messages[0].content", None),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", None),
    ({"model": "tiny", "messages": CHAT * 5}, 400, "messages", None),
    ({"model": "gpt-4", "messages": CHAT}, 404, "model", "model_not_found"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "三国" * 400}]}, 400, "messages",
     "context_length_exceeded"),
    ({"model": "tiny", "messages": CHAT, "max_tokens": 65}, 400, "max_tokens", None),
    ({"model": "tiny", "messages": CHAT, "max_completion_tokens": 1000}, 400, "max_completion_tokens", None),
    ({"model": "tiny", "messages": CHAT, "n": 2}, 400, "n", "unsupported_parameter"),
    ({"model": "tiny", "messages": CHAT, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ({"model": "tiny", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"model": "tiny", "messages": CHAT, "presence_penalty": 5}, 400, "presence_penalty", None),
    ({"model": "tiny"}, 400, "messages", None),
    ([1, 2, 3], 400, None, None),
])
def test_bad_requests_get_openai_error_bodies(served, body, status, param, code):
    response = httpx.post(served.url + "/v1/chat/completions", json=body)
    error = error_of(response)
    assert response.status_code == status and error["param"] == param and error["code"] == code
    assert error["type"] == "invalid_request_error" and error["message"]


def test_malformed_and_oversized_bodies_and_unknown_routes(served, client):
    bad_json = httpx.post(served.url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                          headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "JSON" in error_of(bad_json)["message"]
    huge = httpx.post(served.url + "/v1/chat/completions",
                      json={"model": "tiny", "messages": CHAT, "pad": "x" * 30_000})
    assert huge.status_code == 413 and error_of(huge)["code"] == "body_too_large"

    def chunked():
        for _ in range(30):
            yield b"x" * 1000

    streamed = httpx.post(served.url + "/v1/completions", content=chunked())  # no length given: counted
    assert streamed.status_code == 413
    assert httpx.get(served.url + "/v1/nothing").status_code == 404 and error_of(httpx.get(served.url + "/v1/nothing"))
    assert httpx.get(served.url + "/v1/chat/completions").status_code == 405
    completion = httpx.post(served.url + "/v1/completions", json={"model": "tiny", "prompt": ["a", "b"]})
    assert completion.status_code == 400 and error_of(completion)["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as raised:  # what a client sees
        client.completions.create(model="tiny", prompt="x", echo=True)
    assert raised.value.body["param"] == "echo"
    # and after all that the server still serves
    assert client.completions.create(model="tiny", prompt="x", max_tokens=3).choices[0].finish_reason


def test_full_queue_gets_429_with_retry_after(tmp_path, tokenizer):
    checkpoint = serving_checkpoint(tmp_path / "tiny", tokenizer)
    with run_server(checkpoint, model_name="tiny", num_slots=1, max_waiting=1) as served:
        served.server.stop()  # hold the engine: requests queue up and none finishes
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        body = dict(model="tiny", prompt="三国", max_tokens=4, temperature=0)
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(client.completions.create, **body) for _ in range(2)]
            while served.server.engine.num_waiting < 2:
                threading.Event().wait(0.01)
            full = httpx.post(served.url + "/v1/completions", json=body)
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert error_of(full)["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                client.completions.create(**body)
            served.server.start()  # the held requests now run
            assert all(f.result().choices[0].finish_reason == "length" for f in waiting)


def test_api_key_is_required_when_set(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("XIAOLM_API_KEY", "s3cret-key")
    checkpoint = serving_checkpoint(tmp_path / "tiny", tokenizer)
    with run_server(checkpoint, model_name="tiny") as served:
        for key in ("wrong", "s3cret-ke", "s3cret-key-and-more"):
            with pytest.raises(openai.AuthenticationError) as raised:
                openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0).models.list()
            assert raised.value.status_code == 401 and raised.value.body["code"] == "invalid_api_key"
        no_header = httpx.post(served.url + "/v1/chat/completions", content=b"not even json")
        assert no_header.status_code == 401 and error_of(no_header)["type"] == "authentication_error"
        good = openai.OpenAI(base_url=served.url + "/v1", api_key="s3cret-key", max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=2).usage.completion_tokens >= 1
        health = httpx.get(served.url + "/health").json()  # the page asks here whether to show a key field
        assert health["auth_required"] is True and httpx.get(served.url + "/").status_code == 200


def test_one_log_line_per_request(served, client, caplog):
    with caplog.at_level(logging.INFO, logger="xiaolm.serve"):
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0)
        list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0, stream=True))
        httpx.post(served.url + "/v1/chat/completions", json={"model": "nope", "messages": CHAT})
    lines = [r.getMessage() for r in caplog.records if r.name == "xiaolm.serve"]
    assert len(lines) == 3
    pattern = r"POST /v1/chat/completions 200 [\d.]+s prompt=\d+ completion=6 ttft=[\d.]+s [\d.]+tok/s finish=length"
    assert re.fullmatch(pattern, lines[0]) and re.fullmatch(pattern, lines[1])
    assert lines[2].startswith("POST /v1/chat/completions 404")


def test_serve_never_unpickles_from_the_checkpoint(tmp_path, tokenizer):
    checkpoint = serving_checkpoint(tmp_path / "tiny", tokenizer)
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (checkpoint / "training_state.pt").write_bytes(pickle.dumps(Trap()))
    with run_server(checkpoint, model_name="tiny") as served:
        reply = httpx.post(served.url + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2})
        assert reply.status_code == 200
    assert not marker.exists()


def start_serve_command(checkpoint, *flags) -> tuple[subprocess.Popen, str, list[str]]:
    """`xiaolm serve` in its own process; its URL, and a list its log lines keep arriving in."""
    process = subprocess.Popen([sys.executable, "-m", "xiaolm.cli", "serve", "--ckpt", str(checkpoint), *flags,
                                "--device", "cpu"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    for line in process.stderr:
        log.append(line)
        found = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line)
        if found:
            threading.Thread(target=lambda: log.extend(process.stderr), daemon=True).start()
            return process, found.group(1), log
    process.wait(timeout=30)
    raise AssertionError(f"the server did not start (exit status {process.returncode})")


def test_serve_command_binds_loopback_and_serves_the_page(tmp_path, tokenizer):
    run = tmp_path / "tiny"  # a run folder: the model id is its name, not its latest step folder's
    serving_checkpoint(run / "checkpoints" / "step_000010", tokenizer)
    (run / "checkpoints" / LATEST_FILE).write_text("step_000010")
    process, url, _ = start_serve_command(run, "--port", "0")
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        page = httpx.get(url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert not re.search(r"(src|href)=\"(https?:)?//", page.text)  # nothing from elsewhere: works offline
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_command_lets_a_stream_finish_on_sigterm_then_exits(tmp_path, tokenizer):
    """The engine's loop runs on the main thread of `xiaolm serve`, the HTTP server on another: the
    first SIGTERM stops new connections and the stream in progress still ends whole."""
    # wide enough that 200 tokens take about a second: the signal arrives mid-stream
    checkpoint = serving_checkpoint(tmp_path / "small", tokenizer, hidden_size=256, num_layers=4)
    process, url, log = start_serve_command(checkpoint, "--port", "0", "--model-name", "tiny")
    try:
        body = {"model": "tiny", "prompt": "你好", "max_tokens": 200, "temperature": 0.8, "seed": 1,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert json.loads(first.removeprefix("data: "))["choices"]
        assert rest[-1] == "data: [DONE]"
        usage = json.loads(rest[-2].removeprefix("data: "))["usage"]
        finishes = [choice["finish_reason"] for line in rest[:-1]
                    for choice in json.loads(line.removeprefix("data: "))["choices"] if choice["finish_reason"]]
        assert finishes and finishes[-1] in ("length", "stop"), finishes
        assert usage["completion_tokens"] > 1
        assert process.wait(timeout=60) == -signal.SIGTERM
        text = "".join(log)
        # uvicorn stopped listening before the request ended: it was in progress at the signal
        assert text.index("Shutting down") < text.index("POST /v1/completions 200"), text[-2000:]
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=5)
    finally:
        process.kill()
        process.wait(timeout=30)


def test_serve_command_ends_the_streams_on_a_second_sigint(tmp_path, tokenizer):
    checkpoint = serving_checkpoint(tmp_path / "small", tokenizer, hidden_size=256, num_layers=4)
    process, url, log = start_serve_command(checkpoint, "--port", "0", "--model-name", "tiny")
    try:
        body = {"model": "tiny", "prompt": "你好", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGINT)
            time.sleep(0.1)  # two signals sent at once may arrive as one
            process.send_signal(signal.SIGINT)
            list(lines)  # the stream ends (cut short) rather than hanging
        assert process.wait(timeout=60) == 130  # KeyboardInterrupt, as for every other command
        assert re.search(r"POST /v1/completions 200 .* finish=cancelled", "".join(log)), "".join(log)[-2000:]
        assert "Traceback" not in "".join(log)
    finally:
        process.kill()
        process.wait(timeout=30)


def test_serve_command_on_a_busy_port_exits_with_an_error(tmp_path, tokenizer):
    checkpoint = serving_checkpoint(tmp_path / "tiny", tokenizer)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "xiaolm.cli", "serve", "--ckpt", str(checkpoint), "--port",
                                 str(port), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "address already in use" in result.stderr.lower(), result.stderr[-2000:]


def test_the_readme_client_example_runs(served, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Serving"):]
    example = section[section.index("```python\n") + 10:section.index("\n```", section.index("```python"))]
    code = example.replace("http://127.0.0.1:8000", served.url).replace('"tiny-dpo"', '"tiny"')
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r" (stop|length) \d+\n", out)


def test_serves_a_mixture_of_experts_checkpoint(tmp_path, tokenizer):
    checkpoint = serving_checkpoint(tmp_path / "moe", tokenizer, num_experts=4, num_experts_per_token=2,
                                    num_shared_experts=1, first_k_dense=1)
    with run_server(checkpoint, model_name="moe") as served:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="moe", prompt="三国时期，", max_tokens=12, temperature=0)
        prompt = served.server.tokenizer.encode("三国时期，")
        assert reply.choices[0].text == alone(served, prompt, SamplingConfig(max_new_tokens=12, temperature=0))[0]


def test_an_engine_failure_mid_stream_is_an_error_event_and_serving_goes_on(served, client):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 64, "temperature": 0, "stream": True}
    served.server.stop()  # hold the engine, so the request waits where the test can reach it
    try:
        with httpx.stream("POST", served.url + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: the request is queued
            (request,) = served.server.engine.waiting
            request.sampling.temperature = float("nan")  # the sampler fails at the first step
            served.server.start()
            events = [line for line in lines if line]
    finally:
        served.server.start()
    error = json.loads(events[-2][len("data: "):])
    assert error["error"]["type"] == "server_error" and "RuntimeError" in error["error"]["message"]
    assert events[-1] == "data: [DONE]"
    assert client.completions.create(model="tiny", prompt="a", max_tokens=3).usage.completion_tokens == 3

"""`cerberus serve` against real server processes and the official `openai` client (issue: server).

Two servers are started once for the module: the main one (Medusa with untrained heads, so it
really runs the speculative path but must still match AR output) and a small one with an API key.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from .conftest import PROMPTS

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
KEY = "test-key-123"
CLI = [sys.executable, "-m", "cerberus_decoding.cli"]
SPEC = ["--method", "medusa", "--heads", "none"]
PROMPT = "Write a short poem about the sea."


def free_ports(n: int) -> list[int]:
    """n distinct free ports: bound all at once, so the OS cannot hand out one twice (two servers once
    got the same port, and the second one's tests talked to the first)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_server(args: list[str], log, port: int) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if k != "CERBERUS_API_KEY"}  # the key comes from args only
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, log_path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout}s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(main url, keyed url); both load at once to save time, both are killed at the end."""
    logs = tmp_path_factory.mktemp("server-logs")
    main_log, keyed_log = open(logs / "main.log", "w"), open(logs / "keyed.log", "w")
    ports = free_ports(2)
    main = start_server(SPEC, main_log, ports[0])
    keyed = start_server(["--method", "ar", "--api-key", KEY, "--model-name", "tiny"], keyed_log, ports[1])
    try:
        wait_healthy(*main, logs / "main.log")
        wait_healthy(*keyed, logs / "keyed.log")
        yield main[1], keyed[1]
    finally:
        for proc, _ in (main, keyed):
            proc.kill()
            proc.wait()
        main_log.close()
        keyed_log.close()


@pytest.fixture(scope="module")
def url(servers) -> str:
    return servers[0]


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=180, max_retries=0)


def chat(client, prompt: str, max_tokens: int = 16):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )


@pytest.fixture(scope="module")
def reference(client):
    """The non-streamed greedy reply to PROMPT (16 tokens), shared by the tests that compare to it."""
    return chat(client, PROMPT)


def test_health_and_models(url, client):
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["method"] == "medusa"
    assert [m.id for m in client.models.list().data] == [MODEL, "default"]  # the CLI's name for it too
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_streamed_equals_non_streamed_equals_cli(client, reference):
    # the CLI loads its own model: start it first so it overlaps with the server calls
    cli = subprocess.Popen(
        [*CLI, "generate", PROMPT, "-n", "16", "--json", *SPEC],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    full = reference
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens == 16 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stats = full.model_extra["cerberus"]
    assert stats["method"] == "medusa" and stats["steps"] >= 1 and stats["speculative_steps"] >= 1
    assert stats["mean_accepted"] >= 1 and stats["tokens_per_second"] > 0

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            max_completion_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == choice.finish_reason
    assert finish[0].model_extra["cerberus"]["method"] == "medusa"
    last = chunks[-1]  # OpenAI's usage chunk: no choices
    assert last.choices == [] and last.usage.model_dump() == full.usage.model_dump()

    out, _ = cli.communicate(timeout=300)
    assert cli.returncode == 0
    assert json.loads(out)["text"] == choice.message.content


def test_completions_streamed_equals_non_streamed(client):
    prompt = "The three primary colors are"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert full.choices[0].text and full.usage.completion_tokens <= 8
    assert full.model_extra["cerberus"]["method"] == "medusa"
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == full.choices[0].text


def test_stop_and_sampling_parameters(client, reference):
    full = reference.choices[0].message.content
    cut = full.split()[2]
    stopped = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=16,
        temperature=0,
        stop=[cut, "zzz"],
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[: full.index(cut)]
    sampled = [
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=4,
            temperature=0.8,
            top_p=0.9,
            seed=7,
        )
        for _ in range(2)
    ]
    assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content  # seeded


def test_concurrent_clients_match_sequential(client):
    prompts = PROMPTS[:8]
    sequential = [chat(client, p, 4).choices[0].message.content for p in prompts]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        try:
            own = openai.OpenAI(base_url=client.base_url, api_key="unused", timeout=300, max_retries=0)
            barrier.wait()
            results[i] = chat(own, prompts[i], 4).choices[0].message.content
        except BaseException as e:  # re-raised in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert [results.get(i) for i in range(len(prompts))] == sequential


def test_disconnect_mid_stream_frees_the_model(url, client):
    # counting never ends on its own: without cancellation this would run all 256 tokens (about a minute)
    body = {
        "model": MODEL,
        "prompt": "1, 2, 3, 4, 5, 6, 7,",
        "max_tokens": 256,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(timeout=120) as h, h.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # generation is running: hang up
    start = time.monotonic()
    reply = chat(client, "Say hi", 4)
    assert reply.choices[0].message.content
    assert time.monotonic() - start < 30
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health").json()["pending"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{url}/health").json()["pending"] == 0


LONG = "word " * 10000  # more tokens than the model's 8192-token context
MSG = [{"role": "user", "content": "hi"}]
INVALID = [
    ("chat", b"{not json", 400, None),
    ("chat", b"[1, 2]", 400, None),
    ("chat", {"model": MODEL}, 400, "messages"),
    ("chat", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("chat", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {"model": MODEL, "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"model": MODEL, "messages": MSG, "max_tokens": "16"}, 400, "max_tokens"),
    ("chat", {"model": MODEL, "messages": MSG, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("chat", {"model": MODEL, "messages": MSG, "temperature": -0.1}, 400, "temperature"),
    ("chat", {"model": MODEL, "messages": MSG, "temperature": 2.5}, 400, "temperature"),
    ("chat", {"model": MODEL, "messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("chat", {"model": MODEL, "messages": MSG, "top_p": 0}, 400, "top_p"),
    ("chat", {"model": MODEL, "messages": MSG, "top_p": 1.5}, 400, "top_p"),
    ("chat", {"model": MODEL, "messages": MSG, "stop": 5}, 400, "stop"),
    ("chat", {"model": MODEL, "messages": MSG, "seed": 1.5}, 400, "seed"),
    ("chat", {"model": MODEL, "messages": MSG, "seed": 2**70}, 400, "seed"),
    ("chat", {"model": MODEL, "messages": MSG, "stream": "yes"}, 400, "stream"),
    ("chat", {"model": MODEL, "messages": MSG, "acceptance": "lossy"}, 400, "acceptance"),
    ("chat", {"model": MODEL, "messages": MSG, "n": 2}, 400, "n"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    (
        "chat",
        {"model": MODEL, "messages": [{"role": "user", "content": LONG}], "stream": True},
        400,
        "messages",
    ),
    ("chat", {"model": "gpt-4o", "messages": MSG}, 404, "model"),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": 42}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": LONG}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0, "stream": True}, 400, "max_tokens"),
]


@pytest.mark.parametrize("route, body, status, param", INVALID, ids=[f"{r}-{i}" for i, (r, *_) in enumerate(INVALID)])
def test_invalid_requests_get_openai_errors(url, route, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        f"{url}/v1/{'chat/completions' if route == 'chat' else 'completions'}",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if isinstance(body, dict) and LONG in str(body):
        assert error["code"] == "context_length_exceeded"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_unknown_route_and_openai_client_errors(url, client):
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MSG, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, temperature=3)


def test_api_key(servers):
    url, keyed = servers
    # off: the main server needs no key
    assert httpx.get(f"{url}/v1/models").status_code == 200
    # on: /v1 routes need the bearer key, /health stays open
    assert httpx.get(f"{keyed}/health").status_code == 200
    body = {"model": "tiny", "messages": MSG, "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for r in (
            httpx.get(f"{keyed}/v1/models", headers=headers),
            httpx.post(f"{keyed}/v1/chat/completions", json=body, headers=headers),
        ):
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{keyed}/v1", api_key=KEY, timeout=120, max_retries=0)
    assert [m.id for m in good.models.list().data] == ["tiny", MODEL, "default"]  # --model-name first, then aliases
    reply = good.chat.completions.create(**body)
    assert reply.choices[0].message.content and reply.model == "tiny"
    assert reply.model_extra["cerberus"]["method"] == "ar"


class BrokenDecoder:
    """Stands in for a Decoder whose generation fails unexpectedly (a bug, out of memory, ...)."""

    method = "ar"
    vocab_size = 100
    config = None  # built in code: no effective configuration to report

    def encode(self, prompt, raw=False):
        return [1, 2, 3]

    def check_fits(self, n):
        pass

    def generate(self, ids, cfg, on_text=None, reuse_cache=False):
        raise RuntimeError("boom")


def test_unexpected_failure_is_a_500_and_the_server_keeps_going():
    from fastapi.testclient import TestClient

    from cerberus_decoding.server import create_app

    with TestClient(create_app(BrokenDecoder(), "broken")) as tc:
        r = tc.post("/v1/chat/completions", json={"messages": MSG})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "boom" in r.json()["error"]["message"]
        r = tc.post("/v1/completions", json={"prompt": "hi", "stream": True})
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["message"] == "Internal error: RuntimeError: boom"
        assert tc.get("/health").json() == {"status": "ok", "model": "broken", "method": "ar", "pending": 0}


@pytest.mark.parametrize("acceptance", [None, "exact", "typical"])
def test_seeded_sampling_returns_the_same_text_twice(lm, acceptance):
    """temperature 0.8 + a seed: the same text twice, with the server's default acceptance (exact)
    and with each rule asked for by the ``acceptance`` extension; drafts are really accepted."""
    from fastapi.testclient import TestClient

    from cerberus_decoding.methods import build_decoder
    from cerberus_decoding.server import create_app

    decoder = build_decoder(
        lm, "cerberus-nogate", heads="default", tree=[[0], [1], [0, 0], [0, 0, 0]], min_confidence=0.0
    )
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, "temperature": 0.8, "seed": 5}
    if acceptance is not None:
        body["acceptance"] = acceptance
    with TestClient(create_app(decoder, MODEL)) as tc:
        replies = [tc.post("/v1/chat/completions", json=body).json() for _ in range(2)]
        other = tc.post("/v1/chat/completions", json=body | {"seed": 6}).json()
    texts = [r["choices"][0]["message"]["content"] for r in replies]
    assert texts[0] == texts[1] and texts[0]
    assert other["choices"][0]["message"]["content"] != texts[0]
    assert replies[0]["cerberus"]["mean_accepted"] > 1

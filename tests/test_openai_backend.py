"""The `openai` backend against a real, separately started OpenAI-compatible server
(llama-cpp-python's own ``llama_cpp.server``), an upstream that is down, and one that hangs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import pytest

from policies import key_digest

from .conftest import KEYS, Gateway, answers_ok, free_port, wait_until

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Write a Python function that adds two numbers."}]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, small_model_path):
    """llama.cpp's OpenAI-compatible server on a loopback port, serving the real Qwen 0.5B."""
    port = free_port()
    with open(tmp_path_factory.mktemp("upstream") / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(small_model_path),
             "--model_alias", "up-model", "--host", "127.0.0.1", "--port", str(port),
             "--n_ctx", "2048", "--n_threads", "2"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"

    wait_until(lambda: answers_ok(proc, f"{url}/models", "llama_cpp.server"), 180, 0.2,
               "llama_cpp.server start")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def hanging_upstream():
    """Accepts connections and reads requests but never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


@pytest.fixture(scope="module")
def gw(tmp_path_factory, upstream, hanging_upstream):
    closed = free_port()  # nothing listens here
    fast = {"connect_s": 2, "first_byte_s": 1.5, "total_s": 30}
    policy = {
        "version": 1,
        "backends": {
            "up": {"kind": "openai", "base_url": upstream, "api_key": "env:JG_UPSTREAM_KEY"},
            "down": {"kind": "openai", "base_url": f"http://127.0.0.1:{closed}/v1", "timeouts": fast},
            "hang": {"kind": "openai", "base_url": hanging_upstream, "timeouts": fast},
        },
        "tiers": [
            {"name": "remote", "backend": "up", "model": "up-model", "cost": 1},
            {"name": "down", "backend": "down", "model": "down-model", "cost": 2},
            {"name": "hang", "backend": "hang", "model": "hang-model", "cost": 3},
        ],
        "tenants": {"acme": {"keys": ["sha256:" + key_digest(KEYS["acme"])],
                             "default_tier": "remote"}},
    }
    gateway = Gateway(policy, tmp_path_factory.mktemp("gw-openai"),
                      env={"JG_UPSTREAM_KEY": "sk-upstream-unused"}).start()
    yield gateway
    gateway.stop()


def test_chat_through_http_upstream(gw):
    resp = gw.client().chat.completions.create(model="auto", messages=HELLO, max_tokens=8,
                                               temperature=0)
    assert resp.model == "up-model" and resp.choices[0].message.content
    assert resp.usage.completion_tokens == 8 and resp.usage.prompt_tokens > 10


def test_streaming_passthrough(gw, upstream):
    import openai

    ours = list(gw.client().chat.completions.create(
        model="remote", messages=HELLO, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    theirs = list(openai.OpenAI(base_url=upstream, api_key="x").chat.completions.create(
        model="up-model", messages=HELLO, max_tokens=10, temperature=0, stream=True))
    text = lambda chunks: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # noqa: E731
    assert text(ours) == text(theirs) and len([c for c in ours if c.choices]) >= 3
    assert ours[-1].usage.completion_tokens == 10


def test_completions_through_http_upstream(gw):
    resp = gw.client().completions.create(model="up-model", prompt="def add(a, b):", max_tokens=5,
                                          temperature=0)
    assert resp.choices[0].text and resp.usage.completion_tokens == 5


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tier,status,code,words", [
    ("down", 503, "service_unavailable", "unreachable"),  # nothing listens on the port
    ("hang", 504, "upstream_timeout", "within"),          # accepts, never answers
])
def test_broken_upstreams(gw, tier, status, code, words, stream):
    import openai

    with pytest.raises(openai.APIStatusError) as info:
        result = gw.client().chat.completions.create(model=tier, messages=HELLO, max_tokens=4,
                                                     stream=stream)
        list(result) if stream else None
    assert info.value.status_code == status
    assert info.value.body["code"] == code
    assert words in info.value.body["message"]


def test_readiness_reports_the_broken_upstreams(gw):
    resp = httpx.get(f"{gw.url}/readyz", timeout=30)
    assert resp.status_code == 503
    backends = resp.json()["backends"]
    assert backends["up"]["ok"] and not backends["down"]["ok"] and not backends["hang"]["ok"]

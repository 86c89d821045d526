"""The fake OpenAI upstream the other tests and the overhead benchmark stand on."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from .conftest import FakeUpstream
from .fake_upstream import PLAIN, STREAM, STREAM_WITH_USAGE, Options, start, stream_mode

if TYPE_CHECKING:
    import openai

pytestmark = pytest.mark.e2e  # starts the fake upstream as processes and talks to it over sockets

CHAT = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


@pytest.fixture(scope="module")
def fake():
    up = FakeUpstream()
    yield up
    up.stop()


def sdk(up: FakeUpstream) -> openai.OpenAI:
    import openai

    return openai.OpenAI(base_url=up.url, api_key="x", max_retries=0, timeout=10)


def post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def read_responses(sock: socket.socket, count: int, timeout: float = 10) -> list[bytes]:
    """``count`` whole responses (Content-Length or chunked) read off one connection."""
    sock.settimeout(timeout)
    buf, out = b"", []
    while len(out) < count:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].lower()
            if b"transfer-encoding: chunked" in head:
                stop = buf.find(b"\r\n0\r\n\r\n", end)
                size = stop + 7 if stop >= 0 else None
            else:
                length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
                size = end + 4 + length if len(buf) >= end + 4 + length else None
            if size is not None:
                out.append(buf[:size])
                buf = buf[size:]
                continue
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"connection closed after {len(out)} responses")
        buf += data
    return out


def test_chat_and_completions_are_fixed_openai_objects_with_usage(fake):
    client = sdk(fake)
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert chat.object == "chat.completion" and chat.model == "fake-model"
    assert chat.choices[0].message.content == "Hello! This is a fixed reply from the fake upstream."
    assert chat.choices[0].finish_reason == "stop"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (
        12, 12, 24)
    text = client.completions.create(model="m", prompt="hi")
    assert text.object == "text_completion"
    assert text.choices[0].text == chat.choices[0].message.content
    assert text.usage.total_tokens == 24


def test_chat_log_probabilities_only_when_asked(fake):
    client = sdk(fake)
    messages = [{"role": "user", "content": "hi"}]
    plain = client.chat.completions.create(model="m", messages=messages)
    assert plain.choices[0].logprobs is None
    whole = client.chat.completions.create(model="m", messages=messages, logprobs=True)
    tokens = whole.choices[0].logprobs.content
    assert "".join(t.token for t in tokens) == whole.choices[0].message.content
    assert {t.logprob for t in tokens} == {-0.05}
    events = list(client.chat.completions.create(model="m", messages=messages, logprobs=True,
                                                 stream=True))
    streamed = [t for e in events if e.choices and e.choices[0].logprobs
                for t in e.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [e.choices[0].delta.content for e in events
                                           if e.choices and e.choices[0].delta.content]


def test_streams_send_deltas_a_finish_and_usage_only_when_asked(fake):
    client = sdk(fake)
    messages = [{"role": "user", "content": "hi"}]
    plain = list(client.chat.completions.create(model="m", messages=messages, stream=True))
    assert [c.choices[0].delta.content for c in plain[:4]] == ["Hello", "!", " This", " is"]
    assert plain[0].choices[0].delta.role == "assistant"
    assert len(plain) == 5 and plain[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in plain)
    counted = list(client.chat.completions.create(model="m", messages=messages, stream=True,
                                                  stream_options={"include_usage": True}))
    assert len(counted) == 6 and counted[-1].choices == []
    usage = counted[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (12, 4, 16)
    text = list(client.completions.create(model="m", prompt="hi", stream=True,
                                          stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in text[:-1]) == "Hello! This is"
    assert text[-2].choices[0].finish_reason == "stop" and text[-1].usage.completion_tokens == 4
    raw = httpx.post(f"{fake.url}/chat/completions", content=b'{"stream": true}', timeout=10)
    assert raw.headers["content-type"] == "text/event-stream"
    assert raw.headers["transfer-encoding"] == "chunked"
    assert raw.text.endswith("data: [DONE]\n\n")
    not_streamed = httpx.post(f"{fake.url}/chat/completions", content=b'{"stream": false}')
    assert not_streamed.json()["object"] == "chat.completion"


@pytest.mark.parametrize("body, mode", [
    (CHAT, PLAIN),
    (b'{"stream":false,"stream_options":{"include_usage":true}}', PLAIN),
    (b'{"stream": "true"}', PLAIN),
    (b'{"messages":[{"content":"say \\"stream\\": true"}]}', PLAIN),  # inside a string
    (b'{"stream" : true}', STREAM),
    (b'{"stream":true,"stream_options":{"include_usage":false}}', STREAM),
    (b'{"stream": true, "stream_options": {"include_usage": true}}', STREAM_WITH_USAGE),
])
def test_stream_mode_reads_the_flags_without_parsing(body, mode):
    assert stream_mode(body) == mode


def test_models_health_and_an_openai_shaped_404(fake):
    models = httpx.get(f"{fake.url}/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["fake-model"]
    health = httpx.get(f"http://127.0.0.1:{fake.port}/health", timeout=10)
    assert health.status_code == 200 and health.text == "ok"
    for method, path in (("GET", "/v1/nothing"), ("GET", "/v1/chat/completions"),
                         ("POST", "/v1/models")):
        missing = httpx.request(method, f"http://127.0.0.1:{fake.port}{path}", timeout=10)
        assert missing.status_code == 404
        error = missing.json()["error"]
        assert error["code"] == "not_found" and path in error["message"]
        assert set(error) == {"message", "type", "param", "code"}


def test_keep_alive_pipelining_and_connection_close(fake):
    with socket.create_connection(("127.0.0.1", fake.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                     + post(b"/v1/chat/completions", CHAT)
                     + post(b"/v1/completions", b'{"stream":true}')
                     + b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        health, chat, stream, models = read_responses(sock, 4)
        assert health.endswith(b"\r\n\r\nok") and b"chat.completion" in chat
        assert b"text_completion" in stream and b'"object":"list"' in models
        sock.sendall(post(b"/v1/chat/completions", CHAT, b"Connection: close\r\n"))
        (last,) = read_responses(sock, 1)
        assert b"Connection: close" in last
        assert sock.recv(1) == b""  # the server hung up as asked
    with socket.create_connection(("127.0.0.1", fake.port)) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")


def test_delay_holds_completions_and_keeps_pipelined_answers_in_order():
    slow = FakeUpstream(delay_ms=300)
    try:
        began = time.monotonic()
        assert httpx.get(f"{slow.url}/models", timeout=10).status_code == 200
        assert time.monotonic() - began < 0.25  # only completion requests wait
        began = time.monotonic()
        with socket.create_connection(("127.0.0.1", slow.port)) as sock:
            sock.sendall(post(b"/v1/chat/completions", CHAT)
                         + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                         + post(b"/v1/chat/completions", b'{"stream":true}'))
            chat, health, stream = read_responses(sock, 3)
        assert time.monotonic() - began >= 0.6  # two delayed answers, one after the other
        assert b"chat.completion" in chat and health.endswith(b"ok")
        assert b"data: [DONE]" in stream
    finally:
        slow.stop()


def test_stream_options_model_and_chunk_delay():
    up = FakeUpstream(options=("--model", "other", "--stream-chunks", "6",
                               "--stream-chunk-delay-ms", "50"))
    try:
        began = time.monotonic()
        chunks = list(sdk(up).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True}))
        assert time.monotonic() - began >= 0.35  # 6 deltas, a finish, usage, [DONE]: 50 ms each
        text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
        assert text == "Hello! This is a fixed"
        assert {c.model for c in chunks} == {"other"} and chunks[-1].usage.completion_tokens == 6
    finally:
        up.stop()


def child_pids(pid: int) -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                children.add(int(entry))
    return children


def listening_sockets(port: int) -> int:
    with open("/proc/net/tcp") as fh:
        rows = [line.split() for line in fh.readlines()[1:]]
    return sum(1 for row in rows if row[1].endswith(f":{port:04X}") and row[3] == "0A")


def test_workers_share_the_port_and_stop_with_the_parent():
    up = FakeUpstream(options=("--workers", "3"))
    try:
        workers = child_pids(up.proc.pid)
        assert len(workers) == 2
        # SO_REUSEPORT: each process listens on a socket of its own, all on the one port.
        assert listening_sockets(up.port) == 3
        for _ in range(20):  # a new connection each time
            assert httpx.post(f"{up.url}/chat/completions", content=CHAT,
                              timeout=10).json()["usage"]["total_tokens"] == 24
    finally:
        up.stop()
    assert child_pids(up.proc.pid) == set()
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_it_runs_in_process_on_a_running_loop():
    async def scenario():
        server = await start(Options(model="inline"), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        server.close()
        await server.wait_closed()
        return answer

    answer = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 200 OK") and b'"id":"inline"' in answer

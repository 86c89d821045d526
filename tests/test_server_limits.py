"""Limits of a real ``joulegate serve`` process (issue 15): an 8 MiB header is refused
with 431 while it arrives, an HTTP/1.0 client reads a stream without chunked encoding, and
SIGTERM lets open streams run for the drain period, then ends them with a
``server_shutting_down`` event and ``[DONE]``, their joules settled in the access log."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import threading
import time

import pytest

from .conftest import KEYS, FakeUpstream, access_records, priced_policy

pytestmark = pytest.mark.e2e


def _request(port: int, head: bytes, body: bytes = b"") -> bytes:
    """What the server answers, to its closing the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        with contextlib.suppress(OSError):  # refused while sending: read what it said
            s.sendall(head + body)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def _chat(port: int, version: str, stream: bool = True) -> tuple[bytes, bytes]:
    body = json.dumps({"model": "small", "stream": stream,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/{version}\r\nHost: gw\r\n"
            f"Authorization: Bearer {KEYS['acme']}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head, body


@pytest.fixture
def slow_upstream():
    up = FakeUpstream(options=("--stream-chunks", "400", "--stream-chunk-delay-ms", "25"))
    yield up
    up.stop()


def test_huge_headers_http_1_0_streams_and_the_shutdown_drain(gateways, slow_upstream):
    policy = priced_policy(slow_upstream.url, {})
    policy["server"] = {"shutdown_drain_s": 1.0}
    gw = gateways(policy)

    # An 8 MiB header: 431 in the OpenAI shape, the connection closed.
    answer = _request(gw.port, b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " +
                      b"a" * (8 << 20) + b"\r\n\r\n")
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["code"] == \
        "request_header_fields_too_large"

    # A body far over the head cap, two requests sent in one write on one connection (each
    # arrives whole in one read): both served, neither taken for an over-long head.
    big = json.dumps({"model": "small", "max_tokens": 2, "messages": [
        {"role": "user", "content": "word " * 5_000}]}).encode()  # 25 KB: one read
    heads = [(f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
              f"Authorization: Bearer {KEYS['acme']}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(big)}\r\n{close}\r\n").encode()
             for close in ("", "Connection: close\r\n")]
    answer = _request(gw.port, heads[0] + big + heads[1], big)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"200"], answer[:300]

    # HTTP/1.0: one body with a length, no chunked encoding (a short stream: small tier).
    head, body = _chat(gw.port, "1.0")
    answer = _request(gw.port, head, body)
    headers, _, content = answer.partition(b"\r\n\r\n")
    assert headers.startswith(b"HTTP/1.1 200")
    lowered = headers.lower()
    assert b"transfer-encoding" not in lowered
    length = int(lowered.split(b"content-length: ")[1].split(b"\r\n")[0])
    assert length == len(content) and content.endswith(b"data: [DONE]\n\n")

    # SIGTERM with a stream open: after the drain it gets the shutdown event and [DONE].
    head, body = _chat(gw.port, "1.1")
    result: dict[str, bytes] = {}
    client = threading.Thread(target=lambda: result.update(answer=_request(gw.port, head, body)))
    client.start()
    time.sleep(1.5)  # the stream is under way (400 chunks x 25 ms = 10 s in all)
    gw.signal(signal.SIGTERM)
    client.join(30)
    assert not client.is_alive()
    gw.proc.wait(30)
    text = result["answer"].decode(errors="replace")
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "server_shutting_down"
    assert len(events) > 10  # it ran through the drain before being cut
    # Cut streams are charged what they used (the access log's record of the last one).
    record = [r for r in access_records(gw.log()) if r.get("stream")][-1]
    assert record["energy_joules"] > 0 and record["completion_tokens"] > 0

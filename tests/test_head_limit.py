"""The head cap of ``HeadLimitedHttpTools`` (uvicorn's httptools protocol), fed bytes as a
socket would deliver them: a head over the cap is refused with 431 while it arrives, and a
request whose body is over the cap is served, however its bytes are split into reads."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.limits import HeadLimitedHttpTools

pytestmark = pytest.mark.unit

CAP = 2048


class Transport(asyncio.Transport):
    """The socket side of one connection: what the server wrote, and whether it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(
            name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def echo_length(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body and answers its length."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"bytes": size}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def request(body: bytes, extra_header: bytes = b"") -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n" + extra_header +
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\n\r\n" + body)


def serve(reads: list[bytes]) -> Transport:
    """Feed one connection these reads in turn; what it answered."""
    async def run() -> Transport:
        config = Config(app=echo_length, lifespan="off", log_level="critical")
        config.load()
        protocol = HeadLimitedHttpTools(config=config, server_state=ServerState(),
                                        app_state={})
        protocol.max_head_bytes = CAP
        transport = Transport()
        protocol.connection_made(transport)
        for data in reads:
            if transport.is_closing():
                break
            protocol.data_received(data)
            await asyncio.sleep(0.05)  # the app answers before the next read
        await asyncio.sleep(0.05)
        protocol.connection_lost(None)
        return transport

    return asyncio.run(run())


def statuses(transport: Transport) -> list[bytes]:
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", bytes(transport.written))


BIG = b'{"prompt": "' + b"x" * (4 * CAP) + b'"}'


@pytest.mark.parametrize("split", ["one read", "head then body", "two requests in one read"])
def test_a_body_over_the_cap_is_served_however_it_arrives(split: str) -> None:
    one = request(BIG)
    reads = {"one read": [one, one],  # each whole request in a single read, kept alive
             "head then body": [one[:100], one[100:], one[:100], one[100:]],
             "two requests in one read": [one + one]}[split]
    transport = serve(reads)
    assert statuses(transport) == [b"200", b"200"]  # a 431 would have closed the connection
    assert bytes(transport.written).count(f'{{"bytes": {len(BIG)}}}'.encode()) == 2


def test_a_head_over_the_cap_is_refused_while_it_arrives() -> None:
    head = request(b"{}", b"X-Big: " + b"a" * (4 * CAP) + b"\r\n")
    transport = serve([head[i:i + 1000] for i in range(0, len(head), 1000)])
    assert statuses(transport) == [b"431"]
    assert transport.closed
    assert b"request_header_fields_too_large" in transport.written

"""A client that hangs up closes the upstream request too (openai and vllm backends).

The upstream here is a small SSE server in the test that streams one event every 100 ms
for 10 s and records whether its client (the gateway) went away before the end: the
network boundary is scripted, the gateway's own behaviour is what is tested.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from .conftest import KEYS, free_port, priced_policy, wait_until

pytestmark = pytest.mark.e2e

EVENTS = 100


class SlowSSE:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.sent = 0
        self.cut_off = threading.Event()
        self.finished = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_until(lambda: self._stopping is not None, 10, 0.05, "slow SSE server")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        stopping = asyncio.Event()
        self._stopping = stopping
        await stopping.wait()
        server.close()
        # Finish every connection handler while the loop is still open: a handler left
        # suspended would be closed by the garbage collector after the loop is gone.
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length")), b"0"))
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        try:
            for i in range(EVENTS):
                event = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
                data = f"data: {json.dumps(event)}\n\n".encode()
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                await writer.drain()
                self.sent += 1
                await asyncio.sleep(0.1)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            self.finished.set()
        except (ConnectionError, OSError):
            self.cut_off.set()
        finally:
            writer.close()

    def stop(self) -> None:
        assert self._stopping is not None
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(10)


@pytest.mark.parametrize("kind", ["openai", "vllm"])
def test_hanging_up_closes_the_upstream_stream(kind, gateways):
    upstream = SlowSSE()
    try:
        policy = priced_policy(upstream.url, {"default_tier": "big"})
        policy["backends"]["up-big"]["kind"] = kind
        gw = gateways(policy)
        body = {"model": "big", "prompt": "hello", "max_tokens": 500, "stream": True}
        with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=30,
                          headers={"authorization": f"Bearer {KEYS['acme']}"}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(4)]
        assert any(line.startswith("data: ") for line in got)
        # The upstream notices within a few events that nobody reads any more.
        wait_until(upstream.cut_off.is_set, 8, 0.05, "the upstream stream to be closed")
        assert not upstream.finished.is_set() and upstream.sent < EVENTS
        wait_until(lambda: '"status":499' in gw.log(), 10, 0.1, "the abandoned request logged")
    finally:
        upstream.stop()

"""Send one batch request through the gateway's own HTTP app, in-process.

A batch line is served exactly as a live request is: the same ASGI app, middleware,
endpoint handler and pipeline (routing, budgets, energy accounting, metrics, the access
log). Only the door differs: no socket and no API key. The tenant who created the batch
rides in the ASGI scope under :data:`~gateway.pipeline.TENANT_SCOPE_KEY`, which no HTTP
client can set, and the pipeline takes it in place of a key.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message

from ..pipeline import SUBMITTED_SCOPE_KEY, TENANT_SCOPE_KEY


@dataclass
class Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


async def dispatch(app: ASGIApp, tenant: str, path: str, body: bytes, request_id: str,
                   could_run_at: float | None = None) -> Answer:
    """``POST path`` with ``body`` as ``tenant``; the whole answer. ``could_run_at``: the
    Unix time the request could have run had it not been deferred (for the usage log)."""
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "server": ("joulegate.batch", 0), "client": ("batch", 0),
        "headers": [(b"host", b"joulegate.batch"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", request_id.encode())],
        TENANT_SCOPE_KEY: tenant,
    }
    if could_run_at is not None:
        scope[SUBMITTED_SCOPE_KEY] = float(could_run_at)
    sent = False
    finished = asyncio.Event()
    answer = Answer()
    parts: list[bytes] = []

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()  # the client stays until it has the whole answer
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                              for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                finished.set()

    await app(scope, receive, send)
    answer.body = b"".join(parts)
    return answer

"""Limits a server on the internet needs, where HTTP meets the gateway.

Three layers, each refusing in the OpenAI error shape where the protocol leaves room for a
body:

* :class:`HeadLimitedHttpTools`, uvicorn's httptools protocol counting the bytes of a
  request's head (request line and headers) while they arrive: past
  ``server.limits.max_header_bytes`` it answers 431 and closes the connection, so a huge
  header is never buffered whole (httptools itself has no cap; h11 has one, but answers a
  plain-text 400 and parses in pure Python).
* :class:`HeaderLimits`, ASGI middleware: the number of header fields and their exact size
  (``max_header_count`` / ``max_header_bytes``, also for other HTTP implementations) → 431.
* :func:`install_overload_response`: uvicorn's own answer past ``limit_concurrency`` (a
  plain-text 503) replaced by an OpenAI-shaped 503 with ``Retry-After``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: How ``joulegate serve`` tells every worker process the head cap (workers are spawned).
MAX_HEAD_ENV = "JOULEGATE_MAX_HEADER_BYTES"
DEFAULT_MAX_HEAD = 16 * 1024
#: Seconds a client is asked to wait after a 503 for lack of capacity.
RETRY_AFTER_S = 1

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]


def error_body(message: str, code: str, kind: str = "invalid_request_error") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def _raw_response(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n" + extra +
            b"connection: close\r\n\r\n" + body)


def headers_too_large(limit: int) -> bytes:
    return error_body(f"the request's headers exceed the limit of {limit} bytes",
                      "request_header_fields_too_large")


class HeadLimitedHttpTools(HttpToolsProtocol):
    """httptools' protocol with a cap on the bytes of each request's head.

    Bytes count from the first chunk that arrives while a head is awaited until the chunk
    that completes it; a chunk in which a head completes is not counted, even when a whole
    request (head and body) and the start of the next one came in it, so the cap may be
    passed by at most one read before the refusal (never a false refusal)."""

    max_head_bytes = int(os.environ.get(MAX_HEAD_ENV) or DEFAULT_MAX_HEAD)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_head = True
        self._head_bytes = 0
        #: A head completed during the current ``data_received`` call.
        self._head_done = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._awaiting_head, self._head_done = False, True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head, self._head_bytes = True, 0

    def data_received(self, data: bytes) -> None:
        counting, self._head_done = self._awaiting_head, False
        super().data_received(data)
        # A chunk that held a whole request (its body too) ends awaiting the next head: it
        # is not that head's bytes (counting it refused any request over the cap that
        # arrived in one read, a long prompt on a kept-alive connection).
        if not (counting and self._awaiting_head) or self._head_done \
                or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes:
            self.logger.warning("request head over %d bytes refused", self.max_head_bytes)
            self.transport.write(_raw_response(b"431 Request Header Fields Too Large",
                                               headers_too_large(self.max_head_bytes)))
            self.transport.close()
            self._awaiting_head = False


class HeaderLimits:
    """ASGI middleware: 431 for a request with too many header fields or too many header
    bytes; ``limits()`` gives ``(max_count, max_bytes)`` now (they follow reloads)."""

    def __init__(self, app: ASGIApp, limits: Callable[[], tuple[int, int]]):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            max_count, max_bytes = self.limits()
            headers = scope["headers"]
            size = sum(len(k) + len(v) + 4 for k, v in headers)  # "k: v\r\n"
            if len(headers) > max_count or size > max_bytes:
                what = (f"{len(headers)} header fields exceed the limit of {max_count}"
                        if len(headers) > max_count
                        else f"the request's headers exceed the limit of {max_bytes} bytes")
                body = error_body(what, "request_header_fields_too_large")
                await send({"type": "http.response.start", "status": 431, "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


_OVERLOADED = error_body("the server is at its connection limit; retry shortly",
                         "server_overloaded", "api_error")


async def overloaded(scope: Scope, receive: Receive, send: Send) -> None:
    """What uvicorn answers past ``limit_concurrency``: 503, OpenAI-shaped, Retry-After."""
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_OVERLOADED)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": _OVERLOADED, "more_body": False})


def install_overload_response() -> None:
    """Make uvicorn's HTTP protocols answer :func:`overloaded` past ``limit_concurrency``.

    uvicorn looks its plain-text ``service_unavailable`` up as a module global of each
    protocol module when a request comes in over the limit; there is no option for it."""
    from uvicorn.protocols.http import h11_impl, httptools_impl

    httptools_impl.service_unavailable = overloaded  # type: ignore[attr-defined,assignment]
    h11_impl.service_unavailable = overloaded  # type: ignore[attr-defined,assignment]


if os.environ.get(MAX_HEAD_ENV):
    # A worker process of `joulegate serve --workers N` (spawned: it imports this module
    # to build its protocol class) answers overload as its parent would.
    install_overload_response()

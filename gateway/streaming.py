"""Streamed answers: server-sent events from the backend's chunks, a response that owns its
cleanup (the client's disconnect, the server's shutdown, HTTP/1.0), and every failing
stream ended by an OpenAI-shaped error event and ``[DONE]``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.responses import Response

from backends import Backend, BackendError, Chunk

from . import cascade
from . import openai_types as wire
from .call import Call
from .errors import APIError
from .runtime import Runtime, Snapshot
from .steps import (
    fill_prompt,
    finish,
    on_its_tier,
    response_headers,
    response_id,
    take_tokens,
)

log = logging.getLogger("joulegate")

SSE_DONE = b"data: [DONE]\n\n"


#: The event a stream still open when the server's shutdown drain ends gets, before [DONE].
_SSE_SHUTTING_DOWN = b"data: " + orjson.dumps({"error": {
    "message": "the server is shutting down; retry the request", "type": "api_error",
    "param": None, "code": "server_shutting_down"}}) + b"\n\n"


class SSEResponse(Response):
    """A server-sent-events response that owns its cleanup.

    It streams ``content`` and, beside it, watches ``receive`` for the client's
    disconnect, which cancels the stream at once (the backend stops generating). The
    cleanup runs when the response ends, however it ends: also when the client is gone
    before the first byte, when the body generator never even starts. (Starlette's
    StreamingResponse does the watching with an anyio task group per stream, which cost
    ~17% of the CPU of a streamed request through a fast upstream.)

    An HTTP/1.0 client gets the events buffered into one body with a Content-Length (it
    cannot read chunked encoding). A stream cancelled by the server (uvicorn's shutdown
    drain ran out) ends with a ``server_shutting_down`` error event and ``[DONE]``. While
    it runs, the stream's task is in the app's ``state.open_streams`` (when there is one),
    so that shutdown can wait for its cleanup, which settles its joules.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncGenerator[bytes, None],
                 cleanup: Callable[[], Awaitable[None]], headers: dict[str, str]):
        super().__init__(None, headers={**headers, "cache-control": "no-cache"})
        # Response adds "content-length: 0" for an empty body; a stream has no length.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._content = content
        self._cleanup = cleanup

    def shutdown_tail(self) -> bytes:
        """The last bytes of a stream the server's shutdown stops (an endpoint with
        another event format overrides it)."""
        return _SSE_SHUTTING_DOWN + SSE_DONE

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        streaming = asyncio.current_task()
        assert streaming is not None
        finished = False
        disconnected = False
        started = False
        #: HTTP/1.0: the whole body, sent at the end with its length.
        buffered: list[bytes] | None = [] if scope.get("http_version") == "1.0" else None
        streams = getattr(getattr(scope.get("app"), "state", None), "open_streams", None)
        if streams is not None:
            streams.add(streaming)

        async def watch() -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            if not finished:
                disconnected = True
                streaming.cancel()

        async def end(last: bytes) -> None:
            nonlocal started
            if buffered is not None:
                body = b"".join(buffered) + last
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": [*self.raw_headers,
                                        (b"content-length", str(len(body)).encode())]})
                started = True
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            if not started:
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
                started = True
            await send({"type": "http.response.body", "body": last, "more_body": False})

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            if buffered is None:
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
                started = True
            async for event in self._content:
                if buffered is None:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                else:
                    buffered.append(event)
            finished = True
            await end(b"")
        except asyncio.CancelledError:
            streaming.uncancel()
            if not disconnected:  # the server stopped the stream: say so, then [DONE]
                finished = True
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    async with asyncio.timeout(1.0):  # a client not reading gets no more
                        await end(self.shutdown_tail())
            # else: we cancelled ourselves: the client left, nothing to raise
        finally:
            finished = True
            watcher.cancel()
            await self._content.aclose()
            await self._cleanup()
            if streams is not None:
                streams.discard(streaming)


async def open_stream(runtime: Runtime, snap: Snapshot, call: Call) -> Response:
    """A chat or completions stream, once its first chunk came."""
    chunks, first = await cascade.on_plan(runtime, snap, call, on_its_tier(snap, first_chunk),
                                          cascade.streamed)
    call.first_token_s = time.perf_counter() - call.started
    return stream_response(runtime, snap, call, chunks, sse_events(call, chunks, first))


def stream_response(runtime: Runtime, snap: Snapshot, call: Call,
                    chunks: AsyncGenerator[Chunk, None], events: AsyncGenerator[bytes, None],
                    respond: Callable[[AsyncGenerator[bytes, None], Callable[[], Awaitable[None]],
                                       dict[str, str]], SSEResponse] | None = None
                    ) -> SSEResponse:
    """The response that sends ``events`` (made from the backend's ``chunks``) and from then
    on owns the snapshot and the request's last step: when it ends, however it ends, the
    backend stream is closed, an abandoned or failed request is charged the tokens it
    processed, and :func:`~gateway.steps.finish` runs. ``respond`` makes the response
    (default :class:`SSEResponse`)."""
    ended = False  # the stream reached its last event (or an error event)

    async def body() -> AsyncGenerator[bytes, None]:
        nonlocal ended
        async for event in events:
            yield event
        ended = True

    async def cleanup() -> None:
        await chunks.aclose()  # stops generation and frees the slot if still running
        if not ended and call.status == 200:
            call.status, call.error = 499, "client_disconnected"
        if call.status != 200:  # failed or abandoned: charge the tokens actually processed
            take_tokens(call)
        runtime.release(snap)
        await finish(runtime, snap, call)

    return (respond or SSEResponse)(body(), cleanup, response_headers(call))


async def first_chunk(call: Call, backend: Backend
                      ) -> tuple[AsyncGenerator[Chunk, None], Chunk]:
    chunks = backend.stream(call.req)
    try:
        return chunks, await anext(chunks)
    except BaseException:  # incl. cancellation while waiting for a slot or prefill
        await chunks.aclose()
        take_tokens(call)
        raise  # handle_generation maps a BackendError and records the call


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def sse_events(call: Call, chunks: AsyncIterator[Chunk],
                     first: Chunk) -> AsyncGenerator[bytes, None]:
    """The SSE byte stream. Events known at the same moment go out as one write: the role
    event with the first token, and the finish, usage and ``[DONE]`` events together."""
    rid, created, model, chat = response_id(call), call.created, call.planned.tier.model, call.chat
    parts: list[bytes] = []
    if chat:
        parts.append(_event(wire.chat_chunk(rid, created, model,
                                            {"role": "assistant", "content": ""}, None)))
    chunk: Chunk | None = first
    offset = 0  # a completion's text so far, for its logprobs' text_offset
    text_logprobs = wire.TextLogprobs()  # a chat answer's: of its text only
    try:
        while True:
            if chunk is None:  # the backend ended without a finish reason
                chunk = Chunk(finish_reason="stop")
            entries = text_logprobs.take(chunk) if chat and call.req.logprobs else None
            calls = chunk.tool_calls
            if calls and call.functions:  # the legacy API's one call: the first, as whole
                calls = [d for d in calls if d.index == 0]
            if chat and (chunk.text or calls):
                delta: dict[str, Any] = {}
                if chunk.text or not calls:
                    delta["content"] = chunk.text
                if calls and call.functions:
                    delta["function_call"] = wire.function_call_delta(calls[0])
                elif calls:
                    delta["tool_calls"] = [d.to_openai() for d in calls]
                parts.append(_event(wire.chat_chunk(rid, created, model, delta, None, entries)))
            elif not chat and (chunk.text or chunk.logprobs):
                parts.append(_event(wire.text_chunk(rid, created, model, chunk.text, None,
                                                    chunk.logprobs, offset)))
                offset += len(chunk.text)
            if chunk.usage is not None:
                cut = call.generation
                if cut is not None and cut.overran and chunk.usage.prompt_tokens == 0:
                    fill_prompt(call)  # cut before the upstream's usage: the estimate
                    chunk.usage.prompt_tokens = cut.progress.prompt_tokens
                call.prompt_tokens = chunk.usage.prompt_tokens
                call.completion_tokens = chunk.usage.completion_tokens
            if chunk.finish_reason is not None:
                finish = chunk.finish_reason
                if call.functions:
                    finish = wire.legacy_finish(finish)
                parts.append(_event(wire.chat_chunk(rid, created, model, {}, finish) if chat
                                    else wire.text_chunk(rid, created, model, "", finish)))
                call.settle_energy()
                if call.include_usage:
                    parts.append(_event(wire.usage_chunk(rid, created, model, chat, call.usage())))
                parts.append(SSE_DONE)
                yield b"".join(parts)
                return
            if parts:
                yield b"".join(parts)
                parts = []
            chunk = await anext(chunks, None)
    except BackendError as exc:  # after the headers: an error event, then [DONE]
        parts.append(_event(call.failed(exc).body()))
        parts.append(SSE_DONE)
        yield b"".join(parts)
    except Exception:  # a bug, not the backend: still an OpenAI-shaped end, and logged
        log.exception("stream %s failed", call.request_id)
        err = APIError("internal error; see the gateway log", status=500, code="internal_error")
        parts.append(_event(call.failed(err).body()))
        parts.append(SSE_DONE)
        yield b"".join(parts)

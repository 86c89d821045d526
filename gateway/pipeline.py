"""One request, top to bottom.

:func:`handle_generation` is the whole path of a chat or text completion:

1. take the current policy snapshot (held until the response is finished);
2. authenticate the key → tenant;
3. read (size-limited) and validate the body;
4. pick the tier (:mod:`gateway.routing`);
5. call the backend, whole or streamed;
6. answer in the OpenAI format, with ``X-Joulegate-Tier``, and write one access-log line.

For a stream, steps 5-6 wait for the backend's first chunk before sending headers, so a
backend that cannot serve still gets a proper HTTP error status; after that, a failure
ends the stream with an OpenAI-style error event. A client that disconnects closes the
backend stream, which stops generation and frees its slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from backends import Backend, BackendError, Chunk, GenerationRequest
from policies import TierSpec

from . import openai_types as wire
from .auth import authenticate
from .errors import APIError, BodyTooLarge, InvalidRequest, from_backend_error
from .routing import pick_tier
from .runtime import Runtime, Snapshot

access_log = logging.getLogger("joulegate.access")

_SSE_DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class Call:
    """What the access log records about one request."""

    request_id: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    tenant: str | None = None
    tier: str | None = None
    stream: bool = False
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    error: str | None = None

    def log(self) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        access_log.info(orjson.dumps({
            "request_id": self.request_id, "endpoint": self.endpoint, "tenant": self.tenant,
            "tier": self.tier, "stream": self.stream, "status": self.status,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "latency_s": round(time.perf_counter() - self.started, 6),
            "ttft_s": None if self.first_token_s is None else round(self.first_token_s, 6),
            "error": self.error,
        }).decode())


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing with 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise BodyTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
        parts.append(part)
    return b"".join(parts)


async def handle_generation(runtime: Runtime, request: Request, chat: bool) -> Response:
    """Serve ``POST /v1/chat/completions`` (``chat``) or ``POST /v1/completions``."""
    call = Call(request_id=request.headers.get("x-request-id") or uuid.uuid4().hex,
                endpoint="chat" if chat else "completions")
    snap = runtime.acquire()
    handed_off = False  # a streaming response releases the snapshot when it ends
    try:
        call.tenant = authenticate(snap.tenant_keys, request.headers.get("authorization"))
        body = wire.parse_request(
            wire.ChatCompletionRequest if chat else wire.CompletionRequest,
            await read_body(request, snap.policy.server.max_body_bytes))
        call.stream = body.stream
        tier = pick_tier(snap, call.tenant, body.model)
        call.tier = tier.name
        backend = snap.backend_for(tier)
        generation = body.to_generation(tier.model, call.request_id)
        headers = {"x-joulegate-tier": tier.name, "x-request-id": call.request_id}
        if body.stream:
            response = await _open_stream(runtime, snap, call, backend, generation, tier, chat,
                                          body.include_usage, headers)
            handed_off = True
            return response
        try:
            result = await backend.complete(generation)
        except BackendError as exc:
            raise from_backend_error(exc) from None
        call.prompt_tokens = result.usage.prompt_tokens
        call.completion_tokens = result.usage.completion_tokens
        usage = wire.usage_dict(call.prompt_tokens, call.completion_tokens)
        build = wire.chat_completion if chat else wire.text_completion
        payload = build(_response_id(call, chat), call.created, tier.model, result.text,
                        result.finish_reason, usage)
        return Response(orjson.dumps(payload), media_type="application/json", headers=headers)
    except APIError as exc:
        call.status, call.error = exc.status, exc.code or exc.type
        raise
    finally:
        if not handed_off:
            runtime.release(snap)
            call.log()


def _response_id(call: Call, chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + call.request_id


async def _open_stream(runtime: Runtime, snap: Snapshot, call: Call, backend: Backend,
                       generation: GenerationRequest, tier: TierSpec, chat: bool,
                       include_usage: bool, headers: dict[str, str]) -> Response:
    chunks = backend.stream(generation)
    try:
        first = await anext(chunks)
    except BaseException as exc:  # incl. cancellation while waiting for a slot or prefill
        await chunks.aclose()
        if isinstance(exc, BackendError):
            raise from_backend_error(exc) from None
        raise
    call.first_token_s = time.perf_counter() - call.started
    events = _sse_events(runtime, snap, call, chunks, first, tier.model, chat, include_usage)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={**headers, "cache-control": "no-cache"})


def _event(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _sse_events(runtime: Runtime, snap: Snapshot, call: Call, chunks: AsyncIterator[Chunk],
                      first: Chunk, model: str, chat: bool, include_usage: bool
                      ) -> AsyncIterator[bytes]:
    rid, created = _response_id(call, chat), call.created
    try:
        if chat:
            yield _event(wire.chat_chunk(rid, created, model, {"role": "assistant", "content": ""},
                                         None))
        chunk: Chunk | None = first
        while chunk is not None:
            if chunk.text:
                yield _event(wire.chat_chunk(rid, created, model, {"content": chunk.text}, None)
                             if chat else wire.text_chunk(rid, created, model, chunk.text, None))
            if chunk.usage is not None:
                call.prompt_tokens = chunk.usage.prompt_tokens
                call.completion_tokens = chunk.usage.completion_tokens
            if chunk.finish_reason is not None:
                finish = chunk.finish_reason
                yield _event(wire.chat_chunk(rid, created, model, {}, finish) if chat
                             else wire.text_chunk(rid, created, model, "", finish))
                break
            chunk = await anext(chunks, None)
        if include_usage:
            usage = wire.usage_dict(call.prompt_tokens, call.completion_tokens)
            yield _event(wire.usage_chunk(rid, created, model, chat, usage))
        yield _SSE_DONE
    except BackendError as exc:
        err = from_backend_error(exc)
        call.status, call.error = err.status, err.code or err.type
        yield _event(err.body())
    except (asyncio.CancelledError, GeneratorExit):
        call.status, call.error = 499, "client_disconnected"
        raise
    finally:
        await chunks.aclose()
        runtime.release(snap)
        call.log()

"""One request, top to bottom.

:func:`handle_generation` is the whole path of a chat or text completion:

1. take the current policy snapshot (held until the response is finished);
2. authenticate the key → tenant;
3. read (size-limited) and validate the body;
4. pick the tier: pinned, or scored for difficulty and gated under budget pressure and
   capacity (:mod:`gateway.routing`);
5. reserve its predicted joules against the tenant's budgets, degrading to a cheaper tier
   or refusing with 429 when they do not fit (:mod:`gateway.budgets`);
6. open the request's energy share on the tier's device (:mod:`gateway.energy`);
7. call the backend, whole or streamed;
8. close the share: the joules measured (or estimated) for this request, on every path
   (success, backend failure, client disconnect), and settle the reservation with them,
   so no joule is lost or counted twice (:func:`finish`);
9. answer in the OpenAI format with ``usage.energy_joules`` / ``energy_source`` and the
   ``X-Joulegate-*`` headers; then metrics, calibration and one access-log line
   (:meth:`Call.record`).

For a stream, steps 5-6 wait for the backend's first chunk before sending headers, so a
backend that cannot serve still gets a proper HTTP error status; after that, a failure
ends the stream with an OpenAI-style error event. A client that disconnects closes the
backend stream, which stops generation and frees its slot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
from starlette.requests import Request
from starlette.responses import Response

from backends import (
    Backend,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Chunk,
    GenerationRequest,
    Usage,
)
from policies import TierSpec

from . import logs
from . import openai_types as wire
from .auth import authenticate
from .budgets.guard import Admission, estimate_prompt_tokens
from .energy import RequestEnergy
from .errors import APIError, BodyTooLarge, InvalidRequest, from_backend_error
from .metrics import OTHER, bound
from .routing import MAX_TIER_HEADER, Decision, fallback_tier, pick_tier
from .runtime import Runtime, Snapshot

access_log = logging.getLogger(logs.ACCESS_LOGGER)
log = logging.getLogger("joulegate")

_SSE_DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class Call:
    """One request's facts, gathered along the way and recorded once at the end."""

    request_id: str
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    tenant: str | None = None
    #: The model the client asked for (``auto``, a tier or a model name).
    model: str | None = None
    tier: str | None = None
    stream: bool = False
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    error: str | None = None
    energy: RequestEnergy | None = None
    joules: float = 0.0
    #: Joules of earlier attempts on tiers that failed before answering (fallback).
    spent_before: float = 0.0
    admission: Admission | None = None
    route: Decision | None = None
    #: Request fields refused with 400, and fields accepted but not passed on.
    rejected_params: list[str] = field(default_factory=list)
    dropped_params: list[str] = field(default_factory=list)
    #: Tiers tried before the one that answered, in order (fallback).
    fallback_from: list[str] = field(default_factory=list)
    #: The ledger's key for this request: never the client's X-Request-Id, which may repeat.
    ledger_id: str = field(default_factory=lambda: os.urandom(12).hex())

    def settle_energy(self) -> float:
        """Close the energy share (idempotent) and take the backend's final token counts."""
        if self.energy is not None:
            self.joules = self.spent_before + self.energy.finish()
        return self.joules

    def usage(self) -> dict:
        extra = None
        if self.energy is not None:
            extra = {"energy_joules": round(self.joules, 6), "energy_source": self.energy.source}
        return wire.usage_dict(self.prompt_tokens, self.completion_tokens, extra)

    def record(self, runtime: Runtime, snap: Snapshot) -> None:
        """Metrics, calibration and the access log; called exactly once per request."""
        self.settle_energy()
        m = runtime.metrics
        tenant = bound(self.tenant, snap.policy.tenants)
        tier = bound(self.tier, snap.tiers)
        elapsed = time.perf_counter() - self.started
        m.requests.labels(tenant, tier, str(self.status)).inc()
        if self.energy is not None:
            spec = snap.tiers.get(tier)
            c = m.for_request(tenant, tier, self.energy.source,
                              spec.backend if spec is not None else OTHER)
            c.energy.inc(self.joules)
            c.backend_energy.inc(self.joules)
            c.prompt_tokens.inc(self.prompt_tokens)
            c.completion_tokens.inc(self.completion_tokens)
            c.duration.observe(elapsed)
            if self.first_token_s is not None:
                c.ttft.observe(self.first_token_s)
            if self.completion_tokens > 0:
                c.joules_per_token.observe(self.joules / self.completion_tokens)
            if self.status == 200 and self.tier is not None:
                runtime.calibration.update(self.tier, self.prompt_tokens,
                                           self.completion_tokens, self.joules)
        if snap.policy.server.access_log and access_log.isEnabledFor(logging.INFO):
            logs.access(access_log, self.access_record(elapsed))

    def access_record(self, elapsed: float) -> dict:
        """The access log's record of this request: never prompt text or keys."""
        admission = self.admission
        return {
            "request_id": self.request_id, "endpoint": self.endpoint, "tenant": self.tenant,
            "model": self.model, "tier": self.tier, "stream": self.stream,
            "status": self.status, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "energy_joules": round(self.joules, 6),
            "energy_source": self.energy.source if self.energy else None,
            "latency_s": round(elapsed, 6),
            "ttft_s": None if self.first_token_s is None else round(self.first_token_s, 6),
            "degraded_from": admission.degraded_from if admission else None,
            "fallback_from": self.fallback_from, "rejected_params": self.rejected_params,
            "dropped_params": self.dropped_params, "error": self.error,
        }


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
    call = Call(request_id=(request.headers.get("x-request-id") or "")[:128] or os.urandom(16).hex(),
                endpoint="chat" if chat else "completions")
    snap = runtime.acquire()
    handed_off = False  # a streaming response releases the snapshot when it ends
    try:
        call.tenant = authenticate(snap.tenant_keys, request.headers.get("authorization"))
        body = wire.parse_request(
            wire.ChatCompletionRequest if chat else wire.CompletionRequest,
            await read_body(request, snap.policy.server.max_body_bytes))
        call.stream, call.model = body.stream, body.model
        call.dropped_params = body.dropped_params()
        generation = body.to_generation(body.model, call.request_id)
        # Routing's joule predictions and the budget reservation price the same prompt.
        prompt_tokens = estimate_prompt_tokens(generation)
        decision = call.route = _route(runtime, snap, call.tenant, body.model, generation,
                                       request.headers.get(MAX_TIER_HEADER), prompt_tokens)
        tier = decision.tier
        call.tier = tier.name
        admission = call.admission = await runtime.budgets.admit(
            snap.policy, call.tenant, tier, call.ledger_id, generation, prompt_tokens)
        tier = admission.tier
        call.tier = tier.name
        headers = {"x-request-id": call.request_id}
        if generation.max_tokens is None and admission.max_tokens is not None:
            # A budget bounds the request: the tenant's default_max_tokens was injected.
            headers["x-joulegate-default-max-tokens"] = str(admission.max_tokens)
        generation.model, generation.max_tokens = tier.model, admission.max_tokens
        if call.dropped_params:
            headers["x-joulegate-dropped-params"] = ",".join(call.dropped_params)
        if decision.difficulty is not None:
            headers["x-joulegate-difficulty"] = f"{decision.difficulty.score:.3f}"
        if admission.degraded_from:
            headers["x-joulegate-degraded"] = f"{admission.degraded_from}->{tier.name}"
        if admission.warning:
            headers["x-joulegate-budget-warning"] = admission.warning
        tried = [tier]
        while True:  # one pass per tier tried: the first, then fallbacks
            backend = snap.backend_for(tier)
            call.energy = runtime.energy.open(snap.energy[tier.backend], generation.progress,
                                              scale=tier.cost)
            headers["x-joulegate-tier"] = tier.name
            try:
                if body.stream:
                    response = await _open_stream(runtime, snap, call, backend, generation, tier,
                                                  chat, body.include_usage, headers)
                    handed_off = True
                    return response
                try:
                    result = await backend.complete(generation)
                finally:
                    _take_tokens(call, generation)
                    call.settle_energy()
                break
            except (BackendUnavailable, BackendTimeout) as exc:
                # Nothing reached the client yet: the next tier of the ladder may answer.
                fallback = fallback_tier(snap, call.tenant, decision, tried)
                if fallback is None:
                    raise
                call.spent_before = call.settle_energy()  # the failed attempt's joules count
                runtime.metrics.fallbacks.labels(call.tenant, tier.name, fallback.name).inc()
                log.warning("tier '%s' failed before answering (%s); falling back to '%s'",
                            tier.name, exc, fallback.name)
                call.fallback_from.append(tier.name)
                tier = fallback
                tried.append(tier)
                call.tier = tier.name
                generation.model = tier.model
                generation.progress = Usage()
                headers["x-joulegate-fallback"] = "->".join(t.name for t in tried)
        call.prompt_tokens = result.usage.prompt_tokens
        call.completion_tokens = result.usage.completion_tokens
        headers["x-joulegate-energy-joules"] = f"{call.joules:.6f}"
        headers["x-joulegate-energy-source"] = call.energy.source
        build = wire.chat_completion if chat else wire.text_completion
        payload = build(_response_id(call, chat), call.created, tier.model, result.text,
                        result.finish_reason, call.usage())
        return Response(orjson.dumps(payload), media_type="application/json", headers=headers)
    except BackendError as exc:
        err = from_backend_error(exc)
        call.status, call.error = err.status, err.code or err.type
        err.headers["x-request-id"] = call.request_id
        raise err from None
    except APIError as exc:
        call.status, call.error = exc.status, exc.code or exc.type
        call.rejected_params = list(exc.rejected_params)
        exc.headers["x-request-id"] = call.request_id
        raise
    finally:
        if not handed_off:
            runtime.release(snap)
            await finish(runtime, snap, call)


async def finish(runtime: Runtime, snap: Snapshot, call: Call) -> None:
    """The request's last step: its joules settle the budget reservation, then metrics,
    calibration and the access log. Runs exactly once per request, on every path."""
    joules = call.settle_energy()
    if call.route is not None:
        call.route.settle(joules)
    if call.admission is not None and call.tenant is not None:
        await runtime.budgets.settle(snap.policy, call.tenant, call.ledger_id, call.admission,
                                     joules)
    call.record(runtime, snap)


def _route(runtime: Runtime, snap: Snapshot, tenant: str, model: str,
           generation: GenerationRequest, max_tier: str | None, prompt_tokens: int) -> Decision:
    """Pick the tier and count the decision (see :mod:`gateway.routing`)."""
    max_tokens = generation.max_tokens or snap.policy.tenants[tenant].default_max_tokens

    def predict(tier: TierSpec) -> float:
        return runtime.calibration.predict(tier.name, prompt_tokens, max_tokens)

    decision = pick_tier(snap, tenant, model, generation, max_tier, runtime.capacity,
                         runtime.budgets.remaining_fraction(tenant), predict)
    runtime.metrics.record_route(tenant, decision)
    return decision


def _take_tokens(call: Call, generation: GenerationRequest) -> None:
    """The tokens the backend processed so far (also when it failed part-way)."""
    call.prompt_tokens = generation.progress.prompt_tokens
    call.completion_tokens = generation.progress.completion_tokens


def _response_id(call: Call, chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + call.request_id


class _SSEResponse(Response):
    """A server-sent-events response that owns its cleanup.

    It streams ``content`` and, beside it, watches ``receive`` for the client's
    disconnect, which cancels the stream at once (the backend stops generating). The
    cleanup runs when the response ends, however it ends: also when the client is gone
    before the first byte, when the body generator never even starts. (Starlette's
    StreamingResponse does the watching with an anyio task group per stream, which cost
    ~17% of the CPU of a streamed request through a fast upstream.)
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], cleanup, headers: dict[str, str]):
        super().__init__(None, headers={**headers, "cache-control": "no-cache"})
        # Response adds "content-length: 0" for an empty body; a stream has no length.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._content = content
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.current_task()
        finished = False
        disconnected = False

        async def watch() -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            if not finished:
                disconnected = True
                streaming.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            async for event in self._content:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not disconnected:
                raise
            streaming.uncancel()  # we cancelled ourselves: the client left, nothing to raise
        finally:
            finished = True
            watcher.cancel()
            await self._content.aclose()
            await self._cleanup()


async def _open_stream(runtime: Runtime, snap: Snapshot, call: Call, backend: Backend,
                       generation: GenerationRequest, tier: TierSpec, chat: bool,
                       include_usage: bool, headers: dict[str, str]) -> Response:
    chunks = backend.stream(generation)
    try:
        first = await anext(chunks)
    except BaseException:  # incl. cancellation while waiting for a slot or prefill
        await chunks.aclose()
        _take_tokens(call, generation)
        raise  # handle_generation maps a BackendError and records the call
    call.first_token_s = time.perf_counter() - call.started
    ended = False  # the stream reached [DONE] or an error event

    async def events() -> AsyncIterator[bytes]:
        nonlocal ended
        async for event in _sse_events(call, chunks, first, tier.model, chat, include_usage):
            yield event
        ended = True

    async def cleanup() -> None:
        await chunks.aclose()  # stops generation and frees the slot if still running
        if not ended and call.status == 200:
            call.status, call.error = 499, "client_disconnected"
        if call.status != 200:  # failed or abandoned: charge the tokens actually processed
            _take_tokens(call, generation)
        runtime.release(snap)
        await finish(runtime, snap, call)

    return _SSEResponse(events(), cleanup, headers)


def _event(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _sse_events(call: Call, chunks: AsyncIterator[Chunk], first: Chunk, model: str,
                      chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE byte stream. Events known at the same moment go out as one write: the role
    event with the first token, and the finish, usage and ``[DONE]`` events together."""
    rid, created = _response_id(call, chat), call.created
    parts: list[bytes] = []
    if chat:
        parts.append(_event(wire.chat_chunk(rid, created, model,
                                            {"role": "assistant", "content": ""}, None)))
    chunk: Chunk | None = first
    try:
        while True:
            if chunk is None:  # the backend ended without a finish reason
                chunk = Chunk(finish_reason="stop")
            if chunk.text:
                parts.append(_event(
                    wire.chat_chunk(rid, created, model, {"content": chunk.text}, None) if chat
                    else wire.text_chunk(rid, created, model, chunk.text, None)))
            if chunk.usage is not None:
                call.prompt_tokens = chunk.usage.prompt_tokens
                call.completion_tokens = chunk.usage.completion_tokens
            if chunk.finish_reason is not None:
                finish = chunk.finish_reason
                parts.append(_event(wire.chat_chunk(rid, created, model, {}, finish) if chat
                                    else wire.text_chunk(rid, created, model, "", finish)))
                call.settle_energy()
                if include_usage:
                    parts.append(_event(wire.usage_chunk(rid, created, model, chat, call.usage())))
                parts.append(_SSE_DONE)
                yield b"".join(parts)
                return
            if parts:
                yield b"".join(parts)
                parts = []
            chunk = await anext(chunks, None)
    except BackendError as exc:
        err = from_backend_error(exc)
        call.status, call.error = err.status, err.code or err.type
        parts.append(_event(err.body()))
        yield b"".join(parts)

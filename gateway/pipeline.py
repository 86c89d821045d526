"""One request, top to bottom.

:func:`handle_generation` is the whole path of a chat or text completion, one named step
each:

1. take the current policy snapshot (held until the response is finished);
2. authenticate the key → tenant;
3. :func:`_read`: the (size-limited) body, validated, as the backend request;
4. :func:`_plan`: the tier plan — pinned, or scored for difficulty and gated under
   budget pressure, capacity and load (:mod:`gateway.routing`) — decided once;
5. :func:`_admit`: reserve its predicted joules against the tenant's budgets, which may
   move the plan to a cheaper tier or refuse with 429 (:mod:`gateway.budgets`);
6. :func:`_on_plan`: call the plan's tier, with the request's energy share open on its
   device; a tier that fails before anything reached the client hands the request to the
   next tier of the plan;
7. :func:`_complete` or :func:`_open_stream`: answer in the OpenAI format with
   ``usage.energy_joules`` / ``energy_source`` and the ``X-Joulegate-*`` headers;
8. :func:`finish`: close the share (the joules measured or estimated for this request, on
   every path: success, backend failure, client disconnect), settle the capacity windows
   and the budget reservation with them, so no joule is lost or counted twice; then
   metrics, calibration and one access-log line (:meth:`Call.record`).

Everything that names the tier (capacity, metrics, headers, the access log, ``usage``)
reads the plan's tier: the one that served. For a stream, step 6 waits for the backend's
first chunk before sending headers, so a backend that cannot serve still gets a proper HTTP
error status; after that, a failure ends the stream with an OpenAI-style error event. A
client that disconnects closes the backend stream, which stops generation and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response

from backends import (
    Backend,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Chunk,
    Generation,
    GenerationRequest,
    Usage,
)

from . import logs
from . import openai_types as wire
from .auth import authenticate
from .budgets.guard import Admission, estimate_prompt_tokens
from .capabilities import capable_tiers
from .energy import RequestEnergy
from .errors import APIError, BodyTooLarge, InvalidRequest, to_api_error
from .metrics import OTHER, bound
from .routing import (
    MAX_TIER_HEADER,
    RouteContext,
    RouteRefusal,
    TierPlan,
    degrade_ladder,
    pick_tier,
)
from .runtime import Runtime, Snapshot

access_log = logging.getLogger(logs.ACCESS_LOGGER)
log = logging.getLogger("joulegate")

_SSE_DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


@dataclass(slots=True)
class Call:
    """One request's state: what it asked, the plan it runs on, and the facts gathered
    along the way, recorded once at the end."""

    request_id: str
    chat: bool
    started: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    tenant: str | None = None
    #: The model the client asked for (``auto``, a tier or a model name).
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    generation: GenerationRequest | None = None
    #: The prompt's estimated tokens: routing's predictions and the reservation price it.
    prompt_estimate: int = 0
    plan: TierPlan | None = None
    admission: Admission | None = None
    #: The tenant's default_max_tokens, when a budget injected it.
    default_max_tokens: int | None = None
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    error: str | None = None
    energy: RequestEnergy | None = None
    joules: float = 0.0
    #: Joules of earlier attempts on tiers that failed before answering (fallback).
    spent_before: float = 0.0
    #: Request fields refused with 400, and fields accepted but not passed on.
    rejected_params: list[str] = field(default_factory=list)
    dropped_params: list[str] = field(default_factory=list)
    #: The ledger's key for this request: never the client's X-Request-Id, which may repeat.
    ledger_id: str = field(default_factory=lambda: os.urandom(12).hex())
    #: The tier whose place (:mod:`gateway.tier_slots`) the request holds, if any.
    slot: str | None = None

    @property
    def endpoint(self) -> str:
        return "chat" if self.chat else "completions"

    @property
    def tier(self) -> str | None:
        """The tier that served (or was last tried)."""
        return self.plan.tier.name if self.plan is not None else None

    def failed(self, exc: APIError | BackendError | RouteRefusal) -> APIError:
        """The client's error for ``exc``, noted on the call."""
        err = exc if isinstance(exc, APIError) else to_api_error(exc)
        self.status, self.error = err.status, err.code or err.type
        self.rejected_params = list(err.rejected_params)
        err.headers["x-request-id"] = self.request_id
        return err

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
        if self.plan is not None:
            m.record_route(tenant, self.plan)
        if self.generation is not None and self.generation.overran:
            spec = snap.tiers.get(tier)
            backend = spec.backend if spec is not None else OTHER
            m.upstream_overruns.labels(backend).inc()
            log.warning("request %s: backend '%s' went past max_tokens=%s; stopped and charged "
                        "at most that", self.request_id, backend, self.generation.max_tokens)
            self.error = self.error or "upstream_overran_max_tokens"
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
        plan = self.plan
        return {
            "request_id": self.request_id, "endpoint": self.endpoint, "tenant": self.tenant,
            "model": self.model, "tier": self.tier, "stream": self.stream,
            "status": self.status, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "energy_joules": round(self.joules, 6),
            "energy_source": self.energy.source if self.energy else None,
            "latency_s": round(elapsed, 6),
            "ttft_s": None if self.first_token_s is None else round(self.first_token_s, 6),
            "degraded_from": plan.degraded_from if plan else None,
            "fallback_from": [t.name for t in plan.attempts[:-1]] if plan else [],
            "rejected_params": self.rejected_params,
            "dropped_params": self.dropped_params, "error": self.error,
        }


async def handle_generation(runtime: Runtime, request: Request, chat: bool) -> Response:
    """Serve ``POST /v1/chat/completions`` (``chat``) or ``POST /v1/completions``."""
    call = Call((request.headers.get("x-request-id") or "")[:128] or os.urandom(16).hex(), chat)
    snap = runtime.acquire()
    streaming = False  # a stream releases the snapshot and finishes when it ends
    try:
        call.tenant = authenticate(snap.tenant_keys, request.headers.get("authorization"))
        await _read(snap, call, request)
        _plan(runtime, snap, call, request.headers.get(MAX_TIER_HEADER))
        await _admit(runtime, snap, call)
        if not call.stream:
            return await _complete(runtime, snap, call)
        response = await _open_stream(runtime, snap, call)
        streaming = True
        return response
    except (APIError, BackendError, RouteRefusal) as exc:
        raise call.failed(exc) from None
    finally:
        if not streaming:
            runtime.release(snap)
            await finish(runtime, snap, call)


async def read_body(request: Request, limit: int, timeout_s: float = 30.0) -> bytes:
    """The request body, refusing with 413 as soon as it exceeds ``limit`` bytes, and with
    408 when it has not all arrived within ``timeout_s`` seconds (a slow-body client)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise BodyTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
                parts.append(part)
    except TimeoutError:
        raise APIError(f"the request body did not arrive within {timeout_s:g} s", status=408,
                       code="request_timeout", headers={"connection": "close"}) from None
    return b"".join(parts)


async def _read(snap: Snapshot, call: Call, request: Request) -> None:
    """The body, size-limited and validated, as the backend request."""
    schema = wire.ChatCompletionRequest if call.chat else wire.CompletionRequest
    server = snap.policy.server
    body = wire.parse_request(schema, await read_body(request, server.max_body_bytes,
                                                      server.limits.body_read_timeout_s))
    call.stream, call.model, call.include_usage = body.stream, body.model, body.include_usage
    call.dropped_params = body.dropped_params()
    call.generation = body.to_generation(body.model, call.request_id)
    call.prompt_estimate = estimate_prompt_tokens(call.generation)


def _plan(runtime: Runtime, snap: Snapshot, call: Call, max_tier: str | None) -> None:
    """The request's tier plan, decided once (see :mod:`gateway.routing`)."""
    ctx = _route_context(runtime, snap, call)
    call.plan = TierPlan.route(ctx, pick_tier(ctx, call.model, call.generation, max_tier))


def _route_context(runtime: Runtime, snap: Snapshot, call: Call,
                   capability: str = "generation") -> RouteContext:
    """What routing sees of this tenant and gateway now, as plain data: only the tiers
    that have the ``capability`` the request needs."""
    tenant, generation = call.tenant, call.generation
    spec, routing = snap.policy.tenants[tenant], snap.routing[tenant]
    tiers = capable_tiers(snap.policy, tenant, capability, call.model)
    default = snap.tiers[spec.default_tier]
    max_tokens = spec.default_max_tokens if generation.max_tokens is None else generation.max_tokens
    return RouteContext(
        tiers, default if default in tiers else tiers[0], routing,
        snap.estimators[routing.estimator or "learned"],
        remaining=runtime.budgets.remaining_fraction(tenant) if spec.budgets else None,
        saturated=frozenset(t.name for t in tiers if snap.backend_for(t).saturated()),
        capacity={name: runtime.capacity.window(tenant, name, c)
                  for name, c in (routing.capacity or {}).items()},
        joules={t.name: runtime.calibration.predict(t.name, call.prompt_estimate, max_tokens)
                for t in tiers},
        degrade_ladder=degrade_ladder(spec, tiers))


async def _admit(runtime: Runtime, snap: Snapshot, call: Call) -> None:
    """Reserve the predicted joules against the tenant's budgets; the guard may move the
    plan to a cheaper tier, or refuse."""
    generation = call.generation
    call.admission = await runtime.budgets.admit(
        snap.policy.tenants[call.tenant], call.tenant, call.plan, call.ledger_id, generation,
        call.prompt_estimate)
    if generation.max_tokens is None:
        call.default_max_tokens = call.admission.max_tokens
    generation.max_tokens = call.admission.max_tokens


async def _on_plan(runtime: Runtime, snap: Snapshot, call: Call,
                   attempt: Callable[[Call, Backend], Awaitable[T]]) -> T:
    """``attempt`` on the plan's tier; while a tier fails before anything reached the
    client, the plan moves on to its next tier and ``attempt`` runs there."""
    plan, generation = call.plan, call.generation
    while True:
        tier = plan.attempt()
        generation.model, generation.progress = tier.model, Usage()
        call.energy = runtime.energy.open(snap.energy[tier.backend], generation.progress,
                                          scale=tier.cost)
        try:
            runtime.tier_slots.enter(tier.name, snap.policy.server.limits.max_pending_per_tier)
            call.slot = tier.name
            return await attempt(call, snap.backend_for(tier))
        except (BackendUnavailable, BackendTimeout) as exc:
            _leave_slot(runtime, call)
            if plan.fall_back(str(exc)) is None:
                raise
            call.spent_before = call.settle_energy()  # the failed attempt's joules count
            runtime.metrics.fallbacks.labels(call.tenant, tier.name, plan.tier.name).inc()
            log.warning("tier '%s' failed before answering (%s); falling back to '%s'",
                        tier.name, exc, plan.tier.name)


def _headers(call: Call) -> dict[str, str]:
    """The response's headers: the request id and what the gateway decided."""
    plan = call.plan
    headers = {"x-request-id": call.request_id, "x-joulegate-tier": plan.tier.name}
    if call.default_max_tokens is not None:
        headers["x-joulegate-default-max-tokens"] = str(call.default_max_tokens)
    if call.dropped_params:
        headers["x-joulegate-dropped-params"] = ",".join(call.dropped_params)
    if plan.decision.difficulty is not None:
        headers["x-joulegate-difficulty"] = f"{plan.decision.difficulty.score:.3f}"
    if plan.degraded_from:
        headers["x-joulegate-degraded"] = f"{plan.degraded_from}->{plan.attempts[0].name}"
    if call.admission.warning:
        headers["x-joulegate-budget-warning"] = call.admission.warning
    if len(plan.attempts) > 1:
        headers["x-joulegate-fallback"] = "->".join(t.name for t in plan.attempts)
    return headers


async def _complete(runtime: Runtime, snap: Snapshot, call: Call) -> Response:
    """The whole answer at once."""
    result = await _on_plan(runtime, snap, call, _complete_on)
    call.prompt_tokens = result.usage.prompt_tokens
    call.completion_tokens = result.usage.completion_tokens
    headers = _headers(call)
    headers["x-joulegate-energy-joules"] = f"{call.joules:.6f}"
    headers["x-joulegate-energy-source"] = call.energy.source
    build = wire.chat_completion if call.chat else wire.text_completion
    payload = build(_response_id(call), call.created, call.plan.tier.model, result.text,
                    result.finish_reason, call.usage())
    return Response(orjson.dumps(payload), media_type="application/json", headers=headers)


async def _complete_on(call: Call, backend: Backend) -> Generation:
    try:
        return await backend.complete(call.generation)
    finally:
        _take_tokens(call)
        call.settle_energy()


async def finish(runtime: Runtime, snap: Snapshot, call: Call) -> None:
    """The request's last step: its joules settle the capacity windows and the budget
    reservation, then metrics, calibration and the access log. Runs exactly once per
    request, on every path."""
    _leave_slot(runtime, call)
    joules = call.settle_energy()
    if call.plan is not None:
        call.plan.settle(joules)
    if call.admission is not None:
        await runtime.budgets.settle(snap.policy.tenants[call.tenant], call.tenant,
                                     call.ledger_id, call.admission, joules)
    call.record(runtime, snap)


def _leave_slot(runtime: Runtime, call: Call) -> None:
    """Give back the request's place on its tier (see :mod:`gateway.tier_slots`)."""
    if call.slot is not None:
        runtime.tier_slots.leave(call.slot)
        call.slot = None


def _fill_prompt(call: Call) -> None:
    """A stream that ended before the upstream reported usage (it failed, the client left,
    or it was cut at ``max_tokens``) may know its completion tokens but not its prompt's.
    The prompt was processed all the same: it is charged at the gateway's estimate."""
    if call.generation is None:
        return
    progress = call.generation.progress
    if progress.prompt_tokens == 0 and progress.completion_tokens > 0:
        progress.prompt_tokens = call.prompt_estimate


def _take_tokens(call: Call) -> None:
    """The tokens the backend processed so far (also when it failed part-way)."""
    _fill_prompt(call)
    call.prompt_tokens = call.generation.progress.prompt_tokens
    call.completion_tokens = call.generation.progress.completion_tokens


def _response_id(call: Call) -> str:
    return ("chatcmpl-" if call.chat else "cmpl-") + call.request_id


#: The event a stream still open when the server's shutdown drain ends gets, before [DONE].
_SSE_SHUTTING_DOWN = b"data: " + orjson.dumps({"error": {
    "message": "the server is shutting down; retry the request", "type": "api_error",
    "param": None, "code": "server_shutting_down"}}) + b"\n\n"


class _SSEResponse(Response):
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

    def __init__(self, content: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]],
                 headers: dict[str, str]):
        super().__init__(None, headers={**headers, "cache-control": "no-cache"})
        # Response adds "content-length: 0" for an empty body; a stream has no length.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self._content = content
        self._cleanup = cleanup

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
                        await end(_SSE_SHUTTING_DOWN + _SSE_DONE)
            # else: we cancelled ourselves: the client left, nothing to raise
        finally:
            finished = True
            watcher.cancel()
            await self._content.aclose()
            await self._cleanup()
            if streams is not None:
                streams.discard(streaming)


async def _open_stream(runtime: Runtime, snap: Snapshot, call: Call) -> Response:
    """The stream, once its first chunk came: from then on it owns the snapshot and the
    request's last step."""
    chunks, first = await _on_plan(runtime, snap, call, _first_chunk)
    call.first_token_s = time.perf_counter() - call.started
    ended = False  # the stream reached [DONE] or an error event

    async def events() -> AsyncIterator[bytes]:
        nonlocal ended
        async for event in _sse_events(call, chunks, first):
            yield event
        ended = True

    async def cleanup() -> None:
        await chunks.aclose()  # stops generation and frees the slot if still running
        if not ended and call.status == 200:
            call.status, call.error = 499, "client_disconnected"
        if call.status != 200:  # failed or abandoned: charge the tokens actually processed
            _take_tokens(call)
        runtime.release(snap)
        await finish(runtime, snap, call)

    return _SSEResponse(events(), cleanup, _headers(call))


async def _first_chunk(call: Call, backend: Backend) -> tuple[AsyncIterator[Chunk], Chunk]:
    chunks = backend.stream(call.generation)
    try:
        return chunks, await anext(chunks)
    except BaseException:  # incl. cancellation while waiting for a slot or prefill
        await chunks.aclose()
        _take_tokens(call)
        raise  # handle_generation maps a BackendError and records the call


def _event(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _sse_events(call: Call, chunks: AsyncIterator[Chunk],
                      first: Chunk) -> AsyncIterator[bytes]:
    """The SSE byte stream. Events known at the same moment go out as one write: the role
    event with the first token, and the finish, usage and ``[DONE]`` events together."""
    rid, created, model, chat = _response_id(call), call.created, call.plan.tier.model, call.chat
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
                cut = call.generation
                if cut is not None and cut.overran and chunk.usage.prompt_tokens == 0:
                    _fill_prompt(call)  # cut before the upstream's usage: the estimate
                    chunk.usage.prompt_tokens = cut.progress.prompt_tokens
                call.prompt_tokens = chunk.usage.prompt_tokens
                call.completion_tokens = chunk.usage.completion_tokens
            if chunk.finish_reason is not None:
                finish = chunk.finish_reason
                parts.append(_event(wire.chat_chunk(rid, created, model, {}, finish) if chat
                                    else wire.text_chunk(rid, created, model, "", finish)))
                call.settle_energy()
                if call.include_usage:
                    parts.append(_event(wire.usage_chunk(rid, created, model, chat, call.usage())))
                parts.append(_SSE_DONE)
                yield b"".join(parts)
                return
            if parts:
                yield b"".join(parts)
                parts = []
            chunk = await anext(chunks, None)
    except BackendError as exc:  # after the headers: an error event, then [DONE]
        parts.append(_event(call.failed(exc).body()))
        parts.append(_SSE_DONE)
        yield b"".join(parts)
    except Exception:  # a bug, not the backend: still an OpenAI-shaped end, and logged
        log.exception("stream %s failed", call.request_id)
        err = APIError("internal error; see the gateway log", status=500, code="internal_error")
        parts.append(_event(call.failed(err).body()))
        parts.append(_SSE_DONE)
        yield b"".join(parts)

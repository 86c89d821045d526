"""One request, top to bottom.

:func:`handle_generation` is the whole path of a chat or text completion, one named step
each:

1. take the current policy snapshot (held until the response is finished);
2. authenticate the key → tenant;
3. :func:`read`: the (size-limited) body, validated, as the backend request;
4. :func:`plan`: the tier plan — pinned, or scored for difficulty and gated under
   budget pressure, capacity and load (:mod:`gateway.routing`) — decided once;
5. :func:`admit`: reserve its predicted joules against the tenant's budgets, which may
   move the plan to a cheaper tier or refuse with 429 (:mod:`gateway.budgets`);
6. :func:`on_plan`: call the plan's tier, with the request's energy share open on its
   device; a tier that fails before anything reached the client hands the request to the
   next tier of the plan;
7. :func:`complete` or :func:`~gateway.streaming.open_stream`: answer in the OpenAI format with
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

import os

import orjson
from starlette.requests import Request
from starlette.responses import Response

from backends import Backend, BackendError, Generation

from . import fields
from . import openai_types as wire
from .auth import authenticate
from .call import Call
from .errors import APIError
from .routing import MAX_TIER_HEADER, RouteRefusal
from .runtime import Runtime, Snapshot
from .steps import admit, finish, on_plan, plan, read, response_headers, response_id, take_tokens
from .streaming import open_stream


async def handle_generation(runtime: Runtime, request: Request, chat: bool) -> Response:
    """Serve ``POST /v1/chat/completions`` (``chat``) or ``POST /v1/completions``."""
    call = Call((request.headers.get("x-request-id") or "")[:128] or os.urandom(16).hex(), chat)
    snap = runtime.acquire()
    streaming = False  # a stream releases the snapshot and finishes when it ends
    try:
        call.tenant = authenticate(snap.tenant_keys, request.headers.get("authorization"))
        await read(snap, call, request)
        plan(runtime, snap, call, request.headers.get(MAX_TIER_HEADER))
        await admit(runtime, snap, call)
        if not call.stream:
            return await complete(runtime, snap, call)
        response = await open_stream(runtime, snap, call)
        streaming = True
        return response
    except (APIError, BackendError, RouteRefusal) as exc:
        raise call.failed(exc) from None
    finally:
        if not streaming:
            runtime.release(snap)
            await finish(runtime, snap, call)


async def complete(runtime: Runtime, snap: Snapshot, call: Call) -> Response:
    """The whole answer at once."""
    async def attempt(call: Call, backend: Backend) -> Generation:
        call.dropped_params = fields.on_tier(snap.policy, call.who, call.planned.tier, call.req,
                                             call.dropped_params)
        return await complete_on(call, backend)

    result = await on_plan(runtime, snap, call, attempt)
    call.prompt_tokens = result.usage.prompt_tokens
    call.completion_tokens = result.usage.completion_tokens
    headers = response_headers(call)
    headers["x-joulegate-energy-joules"] = f"{call.joules:.6f}"
    headers["x-joulegate-energy-source"] = call.metered.source
    rid, model = response_id(call), call.planned.tier.model
    if call.chat:
        payload = wire.chat_completion(rid, call.created, model, result.text,
                                       result.finish_reason, call.usage(), result.tool_calls,
                                       result.logprobs)
    else:
        payload = wire.text_completion(rid, call.created, model, result.text,
                                       result.finish_reason, call.usage(), result.logprobs)
    return Response(orjson.dumps(payload), media_type="application/json", headers=headers)


async def complete_on(call: Call, backend: Backend) -> Generation:
    try:
        return await backend.complete(call.req)
    finally:
        take_tokens(call)
        call.settle_energy()

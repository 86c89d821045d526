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

from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response

from backends import BackendError

from . import cascade
from . import openai_types as wire
from .auth import authenticate
from .call import Call
from .errors import APIError, AuthenticationError
from .routing import MAX_TIER_HEADER, RouteRefusal
from .runtime import Runtime, Snapshot
from .steps import (
    admit,
    answer_headers,
    complete_on,
    finish,
    on_its_tier,
    plan,
    read,
    request_id,
    response_id,
)
from .streaming import SSEResponse, open_stream

C = TypeVar("C", bound=Call)

#: The ASGI scope key that names the tenant of a request the gateway sends to itself (a
#: batch's request, :mod:`gateway.batches.dispatch`), in place of an API key. Only code in
#: this process can put it in a scope: no HTTP client can set a scope key.
TENANT_SCOPE_KEY = "joulegate.tenant"
#: Beside it, for deferred work: the Unix time the request could have run at once (the
#: usage log's ``sub``, from which ``joulegate report`` counts what deferral saved).
SUBMITTED_SCOPE_KEY = "joulegate.submitted_at"


def tenant_of(snap: Snapshot, request: Request) -> str:
    """The request's tenant: the one its own scope names, else its key's, else 401."""
    own = request.scope.get(TENANT_SCOPE_KEY)
    if isinstance(own, str):
        if own not in snap.policy.tenants:
            raise AuthenticationError(f"the tenant '{own}' is no longer in the policy")
        return own
    return authenticate(snap.tenant_keys, request.headers.get("authorization"))


async def run_request(runtime: Runtime, request: Request, call: C,
                      read: Callable[[Snapshot, C, Request], Awaitable[None]],
                      answer: Callable[[Runtime, Snapshot, C], Awaitable[Response]],
                      plan: Callable[[Runtime, Snapshot, C, str | None], None] = plan,
                      ) -> Response:
    """One request of any endpoint, top to bottom: authenticate, ``read`` its body, ``plan``
    its tiers, reserve its joules, ``answer``; then :func:`~gateway.steps.finish`, once,
    however it ended. A streamed answer (an :class:`SSEResponse`) owns the snapshot and
    the last step from then on."""
    snap = runtime.acquire()
    handed_off = False
    try:
        call.tenant = tenant_of(snap, request)
        submitted = request.scope.get(SUBMITTED_SCOPE_KEY)
        if isinstance(submitted, float):
            call.submitted_at = submitted
        await read(snap, call, request)
        plan(runtime, snap, call, request.headers.get(MAX_TIER_HEADER))
        await admit(runtime, snap, call)
        response = await answer(runtime, snap, call)
        handed_off = isinstance(response, SSEResponse)
        return response
    except (APIError, BackendError, RouteRefusal) as exc:
        raise call.failed(exc) from None
    finally:
        if not handed_off:
            runtime.release(snap)
            await finish(runtime, snap, call)


async def handle_generation(runtime: Runtime, request: Request, chat: bool) -> Response:
    """Serve ``POST /v1/chat/completions`` (``chat``) or ``POST /v1/completions``."""
    async def answer(runtime: Runtime, snap: Snapshot, call: Call) -> Response:
        return await (open_stream if call.stream else complete)(runtime, snap, call)

    return await run_request(runtime, request, Call(request_id(request), chat), read, answer)


async def complete(runtime: Runtime, snap: Snapshot, call: Call) -> Response:
    """The whole answer at once."""
    result = await cascade.on_plan(runtime, snap, call, on_its_tier(snap, complete_on),
                                   cascade.whole)
    call.prompt_tokens = result.usage.prompt_tokens
    call.completion_tokens = result.usage.completion_tokens
    headers = answer_headers(call)
    rid, model = response_id(call), call.planned.tier.model
    if call.chat:
        payload = wire.chat_completion(rid, call.created, model, result.text,
                                       result.finish_reason, call.usage(), result.tool_calls,
                                       wire.answer_logprobs(result.logprobs, result.text,
                                                            result.tool_calls),
                                       call.functions)
    else:
        payload = wire.text_completion(rid, call.created, model, result.text,
                                       result.finish_reason, call.usage(), result.logprobs)
    return Response(orjson.dumps(payload), media_type="application/json", headers=headers)

"""The steps of a request that every endpoint shares (:mod:`gateway.pipeline` for
generations, :mod:`gateway.embeddings`): read the body, plan the tiers, reserve joules,
call the plan's tier with the energy share open, the response headers, and the last step,
:func:`finish`, that settles and records."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from starlette.requests import Request

from backends import (
    Backend,
    BackendTimeout,
    BackendUnavailable,
    FeatureUnsupported,
    Generation,
    Usage,
)
from policies import TierSpec

from . import fields
from . import openai_types as wire
from .budgets.guard import estimate_prompt_tokens
from .call import Call
from .capabilities import capable_tiers
from .errors import APIError, BodyTooLarge, InvalidRequest
from .routing import RouteContext, TierPlan, degrade_ladder, pick_tier
from .runtime import Runtime, Snapshot

log = logging.getLogger("joulegate")

T = TypeVar("T")


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


async def read(snap: Snapshot, call: Call, request: Request) -> None:
    """The body, size-limited and validated, as the backend request."""
    schema = wire.ChatCompletionRequest if call.chat else wire.CompletionRequest
    server = snap.policy.server
    body = wire.parse_request(schema, await read_body(request, server.max_body_bytes,
                                                      server.limits.body_read_timeout_s),
                              snap.policy.tenants[call.who].unsupported_params)
    call.stream, call.model, call.include_usage = body.stream, body.model, body.include_usage
    call.functions = isinstance(body, wire.ChatCompletionRequest) and body.legacy_functions
    call.dropped_params = body.dropped_params()
    call.generation = generation = body.to_generation(body.model, call.request_id)
    call.prompt_estimate = estimate_prompt_tokens(generation)


def plan(runtime: Runtime, snap: Snapshot, call: Call, max_tier: str | None) -> None:
    """The request's tier plan, decided once (see :mod:`gateway.routing`)."""
    ctx = route_context(runtime, snap, call,
                        ("generation", *fields.needed_capabilities(call.req)))
    call.plan = TierPlan.route(ctx, pick_tier(ctx, call.model or "", call.req, max_tier))


def route_context(runtime: Runtime, snap: Snapshot, call: Call,
                  capability: str | Sequence[str] = "generation") -> RouteContext:
    """What routing sees of this tenant and gateway now, as plain data: only the tiers
    that have the ``capability`` (or every capability) the request needs."""
    tenant = call.who
    spec, routing = snap.policy.tenants[tenant], snap.routing[tenant]
    wanted = (capability,) if isinstance(capability, str) else tuple(capability)
    key = (tenant, wanted, call.model)
    tiers = snap.capable.get(key)
    if tiers is None:  # raises for a model the tenant may not use: never kept
        tiers = snap.capable[key] = capable_tiers(snap.policy, tenant, wanted, call.model)
    default = snap.tiers[spec.default_tier]
    return RouteContext(
        tiers, default if default in tiers else tiers[0], routing,
        snap.estimators[routing.estimator or "learned"],
        remaining=runtime.guard.remaining_fraction(tenant) if spec.budgets else None,
        saturated=frozenset(t.name for t in tiers if snap.backend_for(t).saturated()),
        capacity={name: runtime.capacity.window(tenant, name, c)
                  for name, c in (routing.capacity or {}).items()},
        joules={t.name: predict_joules(runtime, snap, call, t) for t in tiers},
        degrade_ladder=degrade_ladder(spec, tiers),
        carbon={t.name: snap.factors(t).co2_g_per_joule for t in tiers}
        if routing.carbon_weight else {})


def predict_joules(runtime: Runtime, snap: Snapshot, call: Call, tier: TierSpec) -> float:
    """What this request is predicted to cost on ``tier`` (calibrated per tier)."""
    generation = call.req
    max_tokens = (snap.policy.tenants[call.who].default_max_tokens
                  if generation.max_tokens is None else generation.max_tokens)
    return runtime.calibration.predict(tier.name, call.prompt_estimate,
                                       snap.output_tokens(tier, max_tokens))


async def admit(runtime: Runtime, snap: Snapshot, call: Call) -> None:
    """Reserve the predicted joules against the tenant's budgets; the guard may move the
    plan to a cheaper tier, or refuse."""
    generation, tenant = call.req, call.who
    admission = call.admission = await runtime.guard.admit(
        snap.policy.tenants[tenant], tenant, call.planned, call.ledger_id, generation,
        call.prompt_estimate, snap.factors, snap.output_tokens)
    if generation.max_tokens is None:
        call.default_max_tokens = admission.max_tokens
    generation.max_tokens = admission.max_tokens


async def on_plan(runtime: Runtime, snap: Snapshot, call: Call,
                  attempt: Callable[[Call, Backend], Awaitable[T]]) -> T:
    """``attempt`` on the plan's tier; while a tier fails before anything reached the
    client, the plan moves on to its next tier and ``attempt`` runs there."""
    plan, generation = call.planned, call.req
    while True:
        tier = plan.attempt()
        generation.model, generation.progress = tier.model, Usage()
        call.energy = runtime.energy.open(snap.energy[tier.backend], generation.progress,
                                          scale=tier.cost)
        call.factors = snap.factors(tier)
        try:
            runtime.tier_slots.enter(tier.name, snap.policy.server.limits.max_pending_per_tier)
            call.slot = tier.name
            return await attempt(call, snap.backend_for(tier))
        except (BackendUnavailable, BackendTimeout, FeatureUnsupported) as exc:
            leave_slot(runtime, call)
            if plan.fall_back(str(exc)) is None:
                raise
            call.spent_before = call.settle_energy()  # the failed attempt's joules count
            runtime.metrics.fallbacks.labels(call.who, tier.name, plan.tier.name).inc()
            log.warning("tier '%s' failed before answering (%s); falling back to '%s'",
                        tier.name, exc, plan.tier.name)


def response_headers(call: Call) -> dict[str, str]:
    """The response's headers: the request id and what the gateway decided."""
    plan = call.planned
    headers = {"x-request-id": call.request_id, "x-joulegate-tier": plan.tier.name}
    if call.default_max_tokens is not None:
        headers["x-joulegate-default-max-tokens"] = str(call.default_max_tokens)
    if call.dropped_params:
        headers["x-joulegate-dropped-params"] = ",".join(call.dropped_params)
    if plan.decision.difficulty is not None:
        headers["x-joulegate-difficulty"] = f"{plan.decision.difficulty.score:.3f}"
    if plan.degraded_from:
        headers["x-joulegate-degraded"] = f"{plan.degraded_from}->{plan.attempts[0].name}"
    if call.admission is not None and call.admission.warning:
        headers["x-joulegate-budget-warning"] = call.admission.warning
    if failed := plan.fallen_back:  # the failed tiers, then the one the last handed it to
        tried = [t.name for t in plan.attempts]
        headers["x-joulegate-fallback"] = "->".join(
            [*failed, tried[tried.index(failed[-1]) + 1]])
    if plan.confidence is not None:  # estimator: cascade (gateway.cascade)
        headers["x-joulegate-cascade"] = "->".join(
            [plan.escalated_from, plan.tier.name] if plan.escalated_from else [plan.tier.name])
        # Four significant digits: the prompt signal's confidences are small (a plain
        # question's text reads at ~0.03, scrambled words at ~0.0001).
        headers["x-joulegate-cascade-confidence"] = f"{plan.confidence:.4g}"
        if plan.held is not None:
            headers["x-joulegate-cascade-held"] = plan.held
    return headers


async def finish(runtime: Runtime, snap: Snapshot, call: Call) -> None:
    """The request's last step: its joules settle the capacity windows and the budget
    reservation, then metrics, calibration and the access log. Runs exactly once per
    request, on every path."""
    leave_slot(runtime, call)
    joules = call.settle_energy()
    if call.plan is not None:
        call.plan.settle(joules)
    if call.admission is not None:
        # wait=False: the answer does not wait for the ledger's write; the settle is queued
        # before anything asked of the ledger later, so nothing sees it undone.
        await runtime.guard.settle(snap.policy.tenants[call.who], call.who, call.ledger_id,
                                   call.admission, joules, wait=False)
    call.record(runtime, snap)


def leave_slot(runtime: Runtime, call: Call) -> None:
    """Give back the request's place on its tier (see :mod:`gateway.tier_slots`)."""
    if call.slot is not None:
        runtime.tier_slots.leave(call.slot)
        call.slot = None


def fill_prompt(call: Call) -> None:
    """A stream that ended before the upstream reported usage (it failed, the client left,
    or it was cut at ``max_tokens``) may know its completion tokens but not its prompt's.
    The prompt was processed all the same: it is charged at the gateway's estimate."""
    if call.generation is None:  # refused before its body was read
        return
    progress = call.generation.progress
    if progress.prompt_tokens == 0 and progress.completion_tokens > 0:
        progress.prompt_tokens = call.prompt_estimate


def take_tokens(call: Call) -> None:
    """The tokens the backend processed so far (also when it failed part-way)."""
    fill_prompt(call)
    progress = call.req.progress
    call.prompt_tokens, call.completion_tokens = progress.prompt_tokens, progress.completion_tokens


def request_id(request: Request) -> str:
    """The client's ``X-Request-Id`` (up to 128 characters), or a new one."""
    return (request.headers.get("x-request-id") or "")[:128] or os.urandom(16).hex()


def answer_headers(call: Call) -> dict[str, str]:
    """A whole answer's headers: :func:`response_headers` and the request's joules."""
    headers = response_headers(call)
    headers["x-joulegate-energy-joules"] = f"{call.joules:.6f}"
    headers["x-joulegate-energy-source"] = call.metered.source
    fp = call.footprint
    if fp is not None:
        headers.update(fp.headers())
    return headers


def note_tier_drops(snap: Snapshot, call: Call) -> None:
    """The plan's tier is about to serve the request: the parameters it does not use join the
    dropped ones (or refuse it, per the tenant's ``unsupported_params``: :func:`fields.on_tier`),
    for an endpoint whose body has chat's field names (:attr:`Call.chat_fields`)."""
    if call.chat_fields:
        call.dropped_params = fields.on_tier(snap.policy, call.who, call.planned.tier,
                                             call.req, call.dropped_params)


def on_its_tier(snap: Snapshot, attempt: Callable[[Call, Backend], Awaitable[T]]
                ) -> Callable[[Call, Backend], Awaitable[T]]:
    """``attempt`` (the answer on one tier of the plan), after :func:`note_tier_drops`."""
    async def attempt_there(call: Call, backend: Backend) -> T:
        note_tier_drops(snap, call)
        return await attempt(call, backend)
    return attempt_there


async def complete_on(call: Call, backend: Backend) -> Generation:
    """The backend's whole answer; the tokens it processed are taken however it ends."""
    try:
        return await backend.complete(call.req)
    finally:
        take_tokens(call)
        call.settle_energy()


def response_id(call: Call) -> str:
    return ("chatcmpl-" if call.chat else "cmpl-") + call.request_id

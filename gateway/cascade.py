"""The cascade (``routing.estimator: cascade``): answer with the cheap tier, escalate when it
is unsure.

Routing scores nothing up front for a cascade tenant (the ``cascade`` estimator gives every
request 0), so an ``auto`` request plans onto its default, cheapest tier. :func:`on_plan`
then starts that tier's answer as a stream with log-probabilities on and reads its first
``routing.cascade.probe_tokens`` tokens before anything reaches the client. Their
*confidence* (:func:`gateway.routing.estimators.confidence`, by ``routing.cascade.statistic``)
is the geometric mean of their probabilities, ``exp(mean log-probability)``, or the least
likely token's probability:

- at or above ``routing.cascade.threshold`` the answer is accepted: the tokens already made
  are the start of the answer, and the rest follows from the same generation (whole, or
  streamed: the buffered chunks first);
- below it, the cheap stream is closed (generation stops), its joules are settled into
  the request's (``Call.spent_before``, as for a fallback: the tenant pays for the probe and
  the answer, exactly once each), and the plan escalates (:meth:`TierPlan.escalate`) to
  ``routing.cascade.to`` or the next costlier tier that can serve the request, which then
  answers as usual.

With ``routing.cascade.signal: prompt`` the probe reads no answer tokens: the cheap tier
scores the prompt's last ``prompt_tokens`` tokens as it reads them (backends whose
capabilities say ``prompt_logprobs``), and the confidence is how likely it found the
request's own text (:func:`gateway.routing.estimators.prompt_confidence`: a model answers
worse what it finds unfamiliar). An escalation then costs the cheap tier's prompt read and
its first token; an accepted answer costs nothing more.

With ``routing.cascade.prior`` (a difficulty estimator's name) the probe's confidence is
lowered by that estimator's score d of the request before it meets the threshold:
``confidence * exp(-prior_weight * d)`` (:func:`gateway.routing.estimators.with_prior`). The
probe says how sure the cheap tier is, the prior what kind of task it was given. Held out
in turn, HumanEval and MMLU rank better with the two together than with either, while
``mmlu_local`` and MBPP rank worse (`joulegate router eval`, rows ``cascade+heuristic`` and
``cascade-prompt+heuristic``), so ``prior_weight`` is 0 unless set.

A capacity on the tier it would escalate to (``routing.capacity``) holds as it does for
routing: the tenant's capacity windows rank its requests by ``1 - confidence`` once the probe
has read them, and an escalation the window does not admit (not among the least sure
``fraction`` of recent requests, or the share already taken) keeps the cheap answer. With
``threshold: 1`` the capacity alone decides: escalate the least sure ``fraction`` of the
traffic, whatever scale the confidences of this traffic have.

Either way the response says so: ``X-Joulegate-Cascade`` (``small`` accepted, or
``small->full``) and ``X-Joulegate-Cascade-Confidence``, and ``X-Joulegate-Cascade-Held:
full`` when a capacity kept the cheap answer; escalations count in
``joulegate_cascade_escalations_total{tenant,from,to}``, held ones in
``joulegate_cascade_capacity_holds_total{tenant,from,to}``, and the access log's record
carries ``cascade_from``, ``cascade_held`` and ``cascade_confidence``. The cascade applies only to
``auto`` requests that routing sent to their default tier (``gate``), without tools or a
JSON response format (nor, for the prompt signal, a ``suffix``: a filled-in-the-middle prompt
does not end with the request's last words), on a tier that reports the log-probabilities
the signal needs;
everything else (pinned models, budget-degraded or capped plans) runs as planned.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from backends import Backend, Chunk, Generation, Usage
from backends.features import TokenLogprob
from policies import CascadeSpec, TierSpec

from . import fields, steps
from .call import Call
from .capabilities import capable_tiers, tier_capabilities
from .routing.estimators import confidence, prompt_confidence, with_prior
from .routing.features import RequestText
from .runtime import Runtime, Snapshot
from .steps import leave_slot, take_tokens

log = logging.getLogger("joulegate")

T = TypeVar("T")

#: The estimator name that turns the cascade on.
CASCADE = "cascade"


@dataclass(slots=True)
class Probe:
    """The cheap tier's answer so far: its stream (still open unless it ended), the chunks
    read from it, and how sure the tokens in them were."""

    chunks: AsyncGenerator[Chunk, None]
    seen: list[Chunk]
    confidence: float
    #: The client asked for log-probabilities itself (else they are stripped).
    logprobs: bool


def cascade_for(snap: Snapshot, call: Call) -> tuple[CascadeSpec, TierSpec] | None:
    """The cascade settings and the tier to escalate to, when this request cascades."""
    routing = snap.routing[call.who]
    plan, req = call.planned, call.req
    if routing.estimator != CASCADE or plan.decision.reason != "gate" or plan.attempts:
        return None
    if req.tools or (req.response_format is not None and req.response_format.type != "text"):
        return None
    spec = routing.cascade or CascadeSpec()
    if spec.signal == "prompt" and req.suffix is not None:
        # The tier reads a filled-in-the-middle prompt as prefix, suffix, then its middle
        # token: the text the signal judges (the request's last words) is not at its end.
        return None
    caps = tier_capabilities(snap.policy, plan.tier)
    if not (caps.prompt_logprobs if spec.signal == "prompt" else caps.logprobs):
        return None
    able = capable_tiers(snap.policy, call.who,
                         ("generation", *fields.needed_capabilities(req)), call.model)
    costlier = [t for t in able if t.cost > plan.tier.cost]
    if spec.to is not None:
        costlier = [t for t in costlier if t.name == spec.to]
    return (spec, costlier[0]) if costlier else None


async def on_plan(runtime: Runtime, snap: Snapshot, call: Call,
                  attempt: Callable[[Call, Backend], Awaitable[T]],
                  accept: Callable[[Call, Probe], Awaitable[T]]) -> T:
    """:func:`gateway.steps.on_plan` with the cascade in front: ``attempt`` runs on the plan's
    tier, unless the request cascades; then the cheap tier is probed and its answer taken
    by ``accept`` (:func:`whole` or :func:`streamed`), or the request escalates and
    ``attempt`` runs on the costlier tier."""
    cascade = cascade_for(snap, call)
    if cascade is None:
        return await steps.on_plan(runtime, snap, call, attempt)
    spec, target = cascade
    # The request's words, read once and only if the prompt signal or the prior needs them.
    words = functools.cache(lambda: RequestText.of(call.req))

    async def probe_attempt(call: Call, backend: Backend) -> Probe:
        steps.note_tier_drops(snap, call)
        if spec.signal == "prompt":
            return await probe_prompt(call, backend, words().last, spec.prompt_tokens,
                                      spec.statistic)
        return await probe(call, backend, spec.probe_tokens, spec.statistic)

    probed = await steps.on_plan(runtime, snap, call, probe_attempt)
    if spec.prior is not None:
        difficulty = snap.estimators[spec.prior].score_text(words()).score
        probed.confidence = with_prior(probed.confidence, difficulty, spec.prior_weight)
    plan = call.planned
    plan.confidence = probed.confidence
    plan.rescore(1.0 - probed.confidence)  # capacity ranks by how unsure the probe was
    if probed.confidence >= spec.threshold or plan.tier.name == target.name:
        return await accept(call, probed)
    if not plan.may_escalate(target, steps.predict_joules(runtime, snap, call, target)):
        plan.hold(target)
        runtime.metrics.cascade_holds.labels(call.who, plan.tier.name, target.name).inc()
        return await accept(call, probed)
    cheap = plan.tier.name
    await probed.chunks.aclose()  # stops the cheap tier's generation and frees its slot
    take_tokens(call)
    leave_slot(runtime, call)
    call.spent_before = call.settle_energy()  # the probe's joules count
    plan.escalate(target, probed.confidence)
    runtime.metrics.cascade_escalations.labels(call.who, cheap, target.name).inc()
    log.debug("request %s: tier '%s' confidence %.3f < %.3f; escalating to '%s'",
              call.request_id, cheap, probed.confidence, spec.threshold, target.name)
    return await steps.on_plan(runtime, snap, call, attempt)


async def probe(call: Call, backend: Backend, tokens: int, statistic: str = "mean") -> Probe:
    """Start ``backend``'s stream with log-probabilities on and read its first ``tokens``
    tokens (fewer when the answer ends sooner); their :func:`confidence` by ``statistic``."""
    req = call.req
    wanted = req.logprobs
    req.logprobs = True
    chunks = backend.stream(req)
    logprobs: list[float] = []

    def enough(chunk: Chunk) -> bool:
        logprobs.extend(t.logprob for t in chunk.logprobs or ())
        return len(logprobs) >= tokens

    try:
        seen = await _read(call, chunks, enough)
    finally:
        req.logprobs = wanted
    return Probe(chunks, seen, confidence(logprobs[:tokens], statistic), wanted)


async def probe_prompt(call: Call, backend: Backend, text: str, tokens: int,
                       statistic: str = "mean") -> Probe:
    """Start ``backend``'s stream with the prompt's last ``tokens`` tokens scored and read
    their scores, which come before any text: the :func:`prompt_confidence` of the request's
    own ``text`` (its last user turn, or the completion prompt) among them. The answer goes
    on from there (nothing of it is read yet)."""
    req = call.req
    req.prompt_logprobs = tokens
    chunks = backend.stream(req)
    scored: list[TokenLogprob] = []

    def enough(chunk: Chunk) -> bool:
        scored.extend(chunk.prompt_logprobs or ())
        return chunk.prompt_logprobs is not None

    try:
        seen = await _read(call, chunks, enough)
    finally:
        req.prompt_logprobs = 0
    return Probe(chunks, seen, prompt_confidence(scored, text, statistic), req.logprobs)


async def _read(call: Call, chunks: AsyncGenerator[Chunk, None],
                enough: Callable[[Chunk], bool]) -> list[Chunk]:
    """A probe's reading: ``chunks`` until ``enough`` says so of one, the answer ends or the
    stream does; the chunks read, less the prompt's scores (never the client's). On any
    failure (incl. cancellation while waiting for a slot or the prompt read) the stream is
    closed and its tokens counted."""
    seen: list[Chunk] = []
    try:
        while (chunk := await anext(chunks, None)) is not None:
            if chunk.prompt_logprobs is None:
                seen.append(chunk)
            if enough(chunk) or chunk.finish_reason is not None:
                break
    except BaseException:
        await chunks.aclose()
        take_tokens(call)
        raise
    return seen


def _client_view(chunk: Chunk, logprobs: bool) -> Chunk:
    """The chunk as the client asked for it: without log-probabilities unless it asked."""
    if logprobs or chunk.logprobs is None:
        return chunk
    return Chunk(chunk.text, chunk.finish_reason, chunk.usage, chunk.tool_calls, None)


async def replay(probed: Probe) -> AsyncGenerator[Chunk, None]:
    """The accepted answer as one stream: the probed chunks, then the rest."""
    try:
        for chunk in probed.seen:
            yield _client_view(chunk, probed.logprobs)
        if probed.seen and probed.seen[-1].finish_reason is not None:
            return
        async for chunk in probed.chunks:
            yield _client_view(chunk, probed.logprobs)
    finally:
        await probed.chunks.aclose()


async def whole(call: Call, probed: Probe) -> Generation:
    """An accepted probe as the whole answer (``complete``)."""
    text: list[str] = []
    logprobs: list[TokenLogprob] | None = [] if probed.logprobs else None
    finish, usage = "stop", None
    stream = replay(probed)
    try:
        async for chunk in stream:
            text.append(chunk.text)
            if logprobs is not None and chunk.logprobs:
                logprobs.extend(chunk.logprobs)
            finish = chunk.finish_reason or finish
            usage = chunk.usage or usage
    finally:
        await stream.aclose()
        take_tokens(call)
        call.settle_energy()
    progress = call.req.progress
    return Generation("".join(text), finish,
                      usage or Usage(progress.prompt_tokens, progress.completion_tokens),
                      logprobs=logprobs)


async def streamed(call: Call, probed: Probe) -> tuple[AsyncGenerator[Chunk, None], Chunk]:
    """An accepted probe as a stream and its first chunk (``open_stream``)."""
    stream = replay(probed)
    first = await anext(stream, None)
    return stream, first if first is not None else Chunk(finish_reason="stop")

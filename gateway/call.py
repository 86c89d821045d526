"""One request's state (:class:`Call`): what it asked, the plan it runs on, and the facts
gathered along the way, recorded once at the end: metrics, calibration, the access log."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TypeVar

from backends import BackendError, GenerationRequest

from . import logs
from . import openai_types as wire
from .budgets.guard import Admission
from .energy import RequestEnergy
from .errors import APIError, to_api_error
from .metrics import OTHER, bound
from .routing import RouteRefusal, TierPlan
from .runtime import Runtime, Snapshot
from .sustainability import Factors, Footprint

access_log = logging.getLogger(logs.ACCESS_LOGGER)
log = logging.getLogger("joulegate")

T = TypeVar("T")


def _set(value: T | None, what: str) -> T:
    if value is None:
        raise RuntimeError(f"the request's {what} is used before the step that sets it")
    return value


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
    #: A chat request that used the legacy ``functions``: its call is given back so.
    functions: bool = False
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
    #: The facility, water and carbon figures of the site of the tier being tried, taken
    #: when the request started there (:mod:`gateway.sustainability`).
    factors: Factors | None = None
    #: Deferred work (a batch): Unix time it was submitted, when it could have run at once.
    submitted_at: float | None = None
    #: :attr:`footprint` as last computed, with the factors and joules it was computed for.
    _footprint: tuple[Factors, float, Footprint] | None = field(default=None, repr=False)

    # Each step after authentication, reading, planning, admission and metering may rely on
    # what that step set; the accessors below say so to the type checker, and fail loudly
    # if a step ran out of order.

    @property
    def who(self) -> str:
        """The authenticated tenant."""
        return _set(self.tenant, "tenant")

    @property
    def req(self) -> GenerationRequest:
        """The validated request, as the backend gets it."""
        return _set(self.generation, "generation")

    @property
    def planned(self) -> TierPlan:
        return _set(self.plan, "plan")

    @property
    def admitted(self) -> Admission:
        return _set(self.admission, "admission")

    @property
    def metered(self) -> RequestEnergy:
        """The energy share of the tier now being tried."""
        return _set(self.energy, "energy")

    @property
    def endpoint(self) -> str:
        return "chat" if self.chat else "completions"

    @property
    def chat_fields(self) -> bool:
        """The body names its fields as chat and completions do (``messages[i].name``,
        ``user``...), so a tier's unused ones are named so (:func:`fields.on_tier`)."""
        return True

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

    @property
    def footprint(self) -> Footprint | None:
        """Facility joules, water and CO₂ of the joules so far (None before a tier ran);
        computed once for each figure of joules (the body, headers and metrics all read it)."""
        factors, joules = self.factors, self.joules
        if factors is None:
            return None
        cached = self._footprint
        if cached is None or cached[0] is not factors or cached[1] != joules:
            cached = self._footprint = (factors, joules, factors.footprint(joules))
        return cached[2]

    def footprint_usage(self) -> dict[str, object]:
        """``usage``'s facility_joules, water_ml, co2_g, site and co2_source."""
        fp = self.footprint
        return {} if fp is None else fp.usage_fields()

    def usage(self) -> dict[str, object]:
        extra = None
        if self.energy is not None:
            extra = {"energy_joules": round(self.joules, 6), "energy_source": self.energy.source,
                     **self.footprint_usage()}
        return wire.usage_dict(self.prompt_tokens, self.completion_tokens, extra)

    def record(self, runtime: Runtime, snap: Snapshot) -> None:
        """Metrics, calibration and the access log; called exactly once per request."""
        self.settle_energy()
        m = runtime.metrics
        tenant = bound(self.tenant, snap.policy.tenants)
        tier = bound(self.tier, snap.tiers)
        elapsed = time.perf_counter() - self.started
        m.labelled(m.requests, tenant, tier, str(self.status)).inc()
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
                # the serving tier's own joules: not a failed attempt's or a cascade probe's
                runtime.calibration.update(self.tier, self.prompt_tokens,
                                           self.completion_tokens, self.joules - self.spent_before)
            fp = self.footprint
            if fp is not None:
                m.record_footprint(tenant, tier, fp.site, fp.facility_joules,
                                   fp.water_ml / 1000.0, fp.co2_g)
                if runtime.usage_log is not None:
                    runtime.usage_log.append(self.usage_record(tier, fp))
        if snap.policy.server.access_log and access_log.isEnabledFor(logging.INFO):
            logs.access(access_log, self.access_record(elapsed))

    def usage_record(self, tier: str, fp: Footprint) -> dict[str, object]:
        """This request's line in the usage log (:mod:`gateway.usage_log`)."""
        record: dict[str, object] = {
            "t": round(time.time(), 3), "tenant": self.tenant, "tier": tier, "site": fp.site,
            "ep": self.endpoint, "status": self.status, "pt": self.prompt_tokens,
            "ct": self.completion_tokens, "j": round(self.joules, 6),
            "es": self.energy.source if self.energy else None,
            "fj": round(fp.facility_joules, 6), "w": round(fp.water_ml, 6),
            "co2": round(fp.co2_g, 6), "g": fp.g_per_kwh, "cs": fp.co2_source}
        if self.submitted_at is not None:
            record["sub"] = self.submitted_at
        return record

    def access_record(self, elapsed: float) -> dict[str, object]:
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
            "fallback_from": plan.fallen_back if plan else [],
            "cascade_from": plan.escalated_from if plan else None,
            "cascade_held": plan.held if plan else None,
            "cascade_confidence": (None if plan is None or plan.confidence is None
                                   else round(plan.confidence, 6)),
            "rejected_params": self.rejected_params,
            "dropped_params": self.dropped_params, "error": self.error,
        }

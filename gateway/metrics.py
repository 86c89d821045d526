"""Prometheus metrics, served at ``GET /metrics``.

Each app owns its metrics in a private registry (no module-level state). With several
uvicorn workers, ``joulegate serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers
start; prometheus-client then keeps each worker's values in memory-mapped files and
:meth:`Metrics.exposition` merges them. Label values are bounded: tenants and tiers come
from the policy, anything else is ``other``.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

if TYPE_CHECKING:
    from backends.base import Backend, Health

    from .routing.plan import TierPlan

OTHER = "other"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_SCORE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))
_JPT_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100)


_M = TypeVar("_M", Counter, Gauge, Histogram)


def bound(value: str | None, allowed: Collection[str]) -> str:
    """``value`` if the policy knows it, else ``other`` (keeps label cardinality bounded)."""
    return value if value is not None and value in allowed else OTHER


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    energy: Counter
    backend_energy: Counter
    prompt_tokens: Counter
    completion_tokens: Counter
    duration: Histogram
    ttft: Histogram
    joules_per_token: Histogram


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        r = self.registry = CollectorRegistry()
        self.energy = Counter("joulegate_energy_joules", "Energy attributed to requests, joules.",
                              ["tenant", "tier", "source"], registry=r)
        self.backend_energy = Counter("joulegate_backend_energy_joules",
                                      "Energy attributed to requests, by the backend that served "
                                      "them, joules (its rate is the backend's power).",
                                      ["backend", "source"], registry=r)
        self.idle_energy = Counter("joulegate_idle_energy_joules",
                                   "Energy a device used while no request was active, joules.",
                                   ["backend"], registry=r)
        self.power = Gauge("joulegate_power_watts", "Current power from the energy meters.",
                           ["backend", "device"], registry=r, multiprocess_mode="mostrecent")
        self.joules_per_token = Histogram("joulegate_joules_per_token",
                                          "Per request: joules / output tokens.", ["tier"],
                                          buckets=_JPT_BUCKETS, registry=r)
        self.tokens = Counter("joulegate_tokens", "Tokens processed.", ["tenant", "tier", "kind"],
                              registry=r)
        self.requests = Counter("joulegate_requests", "Requests answered.",
                                ["tenant", "tier", "status"], registry=r)
        self.duration = Histogram("joulegate_request_duration_seconds",
                                  "Request latency to the last byte.", ["tier"],
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("joulegate_time_to_first_token_seconds",
                              "Streaming: latency to the first token.", ["tier"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.budget_remaining = Gauge("joulegate_budget_remaining_joules",
                                      "Joules left in the current period of a budget window.",
                                      ["tenant", "window"], registry=r,
                                      multiprocess_mode="mostrecent")
        self.budget_limit = Gauge("joulegate_budget_limit_joules",
                                  "A budget window's joules for the current period (granted "
                                  "top-ups included).", ["tenant", "window"], registry=r,
                                  multiprocess_mode="mostrecent")
        self.budget_soft_ratio = Gauge("joulegate_budget_soft_threshold_ratio",
                                       "Share of a budget window's joules past which responses "
                                       "carry a warning (soft_pct / 100).", ["tenant", "window"],
                                       registry=r, multiprocess_mode="mostrecent")
        self.budget_reserved = Gauge("joulegate_budget_reserved_joules",
                                     "Joules held by a tenant's requests in flight.", ["tenant"],
                                     registry=r, multiprocess_mode="mostrecent")
        self.budget_rejections = Counter("joulegate_budget_rejections",
                                         "Requests refused (or served unmetered) by budgets.",
                                         ["tenant", "reason"], registry=r)
        self.budget_degradations = Counter("joulegate_budget_degradations",
                                           "Requests moved to a cheaper tier by their budget.",
                                           ["tenant", "from", "to"], registry=r)
        self.budget_soft_warnings = Counter("joulegate_budget_soft_warnings",
                                            "Responses past a budget's soft threshold.",
                                            ["tenant", "window"], registry=r)
        self.route_decisions = Counter("joulegate_route_decisions",
                                       "Tiers that served and why: gate, capacity, budget, "
                                       "load, pinned, capped or fallback.",
                                       ["tenant", "tier", "reason"], registry=r)
        self.difficulty = Histogram("joulegate_difficulty_score",
                                    "Difficulty scores of routed (model: auto) requests.",
                                    ["tenant"], buckets=_SCORE_BUCKETS, registry=r)
        self.capacity_fraction = Gauge("joulegate_capacity_fraction",
                                       "Realised share of a tenant's routed requests (or joules) "
                                       "on a capacity-limited tier, over its window.",
                                       ["tenant", "tier"], registry=r,
                                       multiprocess_mode="mostrecent")
        self.upstream_overruns = Counter("joulegate_upstream_overruns",
                                         "Answers of upstreams that went past max_tokens: "
                                         "cut (streams) or charged only up to it.", ["backend"],
                                         registry=r)
        self.fallbacks = Counter("joulegate_fallbacks",
                                 "Requests retried on another tier after their tier failed "
                                 "before answering.", ["tenant", "from", "to"], registry=r)
        self.cascade_escalations = Counter(
            "joulegate_cascade_escalations",
            "Requests (estimator: cascade) whose cheap tier's first tokens were too unsure, "
            "escalated to a costlier tier.", ["tenant", "from", "to"], registry=r)
        self.cascade_holds = Counter(
            "joulegate_cascade_capacity_holds",
            "Requests (estimator: cascade) unsure enough to escalate that the costlier tier's "
            "capacity kept on the cheap tier.", ["tenant", "from", "to"], registry=r)
        self.backend_waiting = Gauge("joulegate_backend_waiting_requests",
                                     "Requests queued in an upstream server (vLLM).", ["backend"],
                                     registry=r, multiprocess_mode="mostrecent")
        self.backend_running = Gauge("joulegate_backend_running_requests",
                                     "Requests running in an upstream server (vLLM).", ["backend"],
                                     registry=r, multiprocess_mode="mostrecent")
        self.backend_token_rate = Gauge("joulegate_backend_tokens_per_second",
                                        "Upstream server's token throughput (all its clients).",
                                        ["backend", "kind"], registry=r,
                                        multiprocess_mode="mostrecent")
        self.backend_up = Gauge("joulegate_backend_up",
                                "1 when the backend's last health probe passed, else 0.",
                                ["backend"], registry=r, multiprocess_mode="mostrecent")
        self.background_task_restarts = Counter("joulegate_background_task_restarts",
                                                "Background loops (budget reconcile, health "
                                                "watch, calibration saver, energy timers, "
                                                "meter pollers) restarted after they failed.",
                                                ["task"], registry=r)
        self.facility_energy = Counter("joulegate_facility_energy_joules",
                                       "Facility energy of requests (IT joules x the site's "
                                       "PUE), joules.", ["tenant", "tier", "site"], registry=r)
        self.water = Counter("joulegate_water_litres",
                             "Site water of requests (IT kWh x the site's WUE), litres.",
                             ["tenant", "tier", "site"], registry=r)
        self.co2 = Counter("joulegate_co2_grams",
                           "CO2 of requests (facility kWh x the site's carbon intensity), grams.",
                           ["tenant", "tier", "site"], registry=r)
        self.carbon_intensity = Gauge("joulegate_carbon_intensity_g_per_kwh",
                                      "A site's grid carbon intensity now, gCO2/kWh.", ["site"],
                                      registry=r, multiprocess_mode="mostrecent")
        self._footprints: dict[tuple[str, str, str], tuple[Counter, Counter, Counter]] = {}
        self._children: dict[tuple[str, str, str, str], RequestMetrics] = {}
        self._decisions: dict[tuple[str, str, str], Counter] = {}
        self._labelled: dict[tuple[object, tuple[str, ...]], object] = {}

    def for_request(self, tenant: str, tier: str, source: str, backend: str) -> RequestMetrics:
        """The labelled children one request updates, cached per label combination (the
        combinations are bounded by the policy, so the cache is too)."""
        key = (tenant, tier, source, backend)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = RequestMetrics(
                energy=self.energy.labels(tenant, tier, source),
                backend_energy=self.backend_energy.labels(backend, source),
                prompt_tokens=self.tokens.labels(tenant, tier, "prompt"),
                completion_tokens=self.tokens.labels(tenant, tier, "completion"),
                duration=self.duration.labels(tier),
                ttft=self.ttft.labels(tier),
                joules_per_token=self.joules_per_token.labels(tier),
            )
        return children

    def record_footprint(self, tenant: str, tier: str, site: str, facility_joules: float,
                         water_litres: float, co2_g: float) -> None:
        """Count a request's facility joules, water and CO₂ (children cached per labels)."""
        key = (tenant, tier, site)
        children = self._footprints.get(key)
        if children is None:
            children = self._footprints[key] = (self.facility_energy.labels(*key),
                                                self.water.labels(*key), self.co2.labels(*key))
        children[0].inc(facility_joules)
        children[1].inc(water_litres)
        children[2].inc(co2_g)

    def labelled(self, metric: _M, *values: str) -> _M:
        """``metric.labels(*values)``, cached: for the request path, whose label values come
        from the policy or a small fixed set (bounded), and never for a series that is
        removed (``.labels()`` costs a lock and a few microseconds each time)."""
        key = (metric, values)
        child = self._labelled.get(key)
        if child is None:
            child = self._labelled[key] = metric.labels(*values)
        return child  # type: ignore[return-value]

    def record_route(self, tenant: str, plan: TierPlan) -> None:
        """Count a request's tier plan (:class:`gateway.routing.TierPlan`) once it is done:
        the tier that served and why it was the one."""
        key = (tenant, plan.tier.name, plan.reason)
        child = self._decisions.get(key)  # bounded: tenants x tiers x reasons of the policy
        if child is None:
            child = self._decisions[key] = self.route_decisions.labels(*key)
        child.inc()
        if plan.decision.difficulty is not None:
            self.labelled(self.difficulty, tenant).observe(plan.decision.difficulty.score)
        for window, _ in plan.decision.entries:
            self.labelled(self.capacity_fraction, tenant, window.tier).set(window.fraction())

    def record_backend_load(self, backends: Mapping[str, Backend]) -> None:
        """Queue depth and token rates of backends that report load (vLLM), as last scraped."""
        for name, backend in backends.items():
            now = backend.load()
            if now is None:
                continue
            self.backend_waiting.labels(name).set(now.waiting)
            self.backend_running.labels(name).set(now.running)
            self.backend_token_rate.labels(name, "prompt").set(now.prompt_tokens_per_s)
            self.backend_token_rate.labels(name, "generation").set(now.generation_tokens_per_s)

    def record_health(self, health: Mapping[str, Health], gone: set[str]) -> None:
        """``joulegate_backend_up`` from the latest probes (backend name → Health); the series
        of backends a reload removed are dropped."""
        for name, result in health.items():
            self.backend_up.labels(name).set(1 if result.ok else 0)
        for name in gone:
            self.backend_up.remove(name)

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every metric (merged across worker processes)."""
        if self.multiprocess:
            merged = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

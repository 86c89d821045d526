"""When a batch runs, and what its requests cost in CO₂ against running at once.

A batch runs where its requests would be routed: each line's ``model`` names a tier (a
tier name, a tier's model, or ``auto``: the tenant's default tier), each tier's backend runs
at a site, and the site with the most lines gives the carbon source. The batch starts at
:func:`~gateway.carbon.cleanest_start` of that source's forecast over its window, for the
duration it is expected to take (lines ÷ concurrency × ``batches.line_seconds``). A site
without a carbon source (or a window too short for the work) starts it at once.

Each finished request's CO₂ is its IT joules × the site's gCO₂ per IT joule (PUE ×
intensity) at the instant it ran, *by the batch clock*; what it would have cost at once is
the same joules at the instant it would have run had the batch started when it was
submitted (submission + how far into the batch it ran). The batch reports both sums and
their difference, the CO₂ avoided by waiting.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from ..carbon import CarbonUnavailable, cleanest_start
from ..runtime import Snapshot
from ..sustainability import DEFAULT_SITE, Site
from .clock import from_unix, unix


def _tier_backend(snap: Snapshot, tenant: str, model: object) -> str | None:
    spec = snap.policy.tenants.get(tenant)
    if spec is None:
        return None
    if not isinstance(model, str) or model == "auto":
        model = spec.default_tier
    tier = snap.tiers.get(model) or snap.models.get(model)
    return tier.backend if tier is not None else None


def batch_site(snap: Snapshot, tenant: str, bodies: list[bytes]) -> Site:
    """The site most of the batch's requests would run at."""
    sites: Counter[str] = Counter()
    by_model: dict[object, str | None] = {}
    for body in bodies:
        model = orjson.loads(body).get("model")
        key = model if isinstance(model, str) else None
        if key not in by_model:
            backend = _tier_backend(snap, tenant, model)
            site = snap.sites.get(backend) if backend is not None else None
            by_model[key] = site.name if site is not None else None
        name = by_model[key]
        if name is not None:
            sites[name] += 1
    if not sites:
        return snap.site_by_name[DEFAULT_SITE]
    return snap.site_by_name[sites.most_common(1)[0][0]]


@dataclass(frozen=True)
class Schedule:
    site: str
    #: The carbon source's label (``schedule``, ``constant``, ``prometheus``), or ``none``.
    source: str
    created_at: float
    scheduled_at: float
    expires_at: float
    expected_duration_s: float
    g_per_kwh_at_submit: float | None
    g_per_kwh_at_start: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def schedule(site: Site, created: datetime, window_s: float, lines: int, concurrency: int,
             line_seconds: float) -> Schedule:
    """When a batch of ``lines`` requests submitted at ``created`` should start."""
    expires = created + timedelta(seconds=window_s)
    duration = timedelta(seconds=math.ceil(lines / max(concurrency, 1)) * line_seconds)
    start, source = created, "none"
    now_g: float | None = None
    start_g: float | None = None
    if site.carbon is not None:
        try:
            now_g = site.carbon.intensity(created)
            start = cleanest_start(site.carbon, created, expires, duration)
            start_g = site.carbon.intensity(start)
            source = site.carbon.source
        except CarbonUnavailable:
            start, source = created, "unavailable"
    return Schedule(site.name, source, created.timestamp(), start.timestamp(),
                    expires.timestamp(), duration.total_seconds(), now_g, start_g)


@dataclass(frozen=True)
class LineCarbon:
    facility_joules: float
    co2_g: float
    co2_g_if_immediate: float


def line_carbon(snap: Snapshot, tier: str | None, joules: float, ran_at: datetime,
                immediate_at: datetime) -> LineCarbon | None:
    """A finished request's facility joules and CO₂ (now and had it run at once), from the
    site of the tier that served it; None when the tier is unknown."""
    spec = snap.tiers.get(tier) if tier is not None else None
    site = snap.sites.get(spec.backend) if spec is not None else None
    if site is None:
        return None
    ran, at_once = site.factors(ran_at), site.factors(immediate_at)
    return LineCarbon(joules * site.pue, joules * ran.co2_g_per_joule,
                      joules * at_once.co2_g_per_joule)


def immediate_instant(plan: dict[str, Any], ran_at: datetime) -> datetime:
    """When a request that ran at ``ran_at`` would have run had the batch started when it
    was submitted."""
    started = plan.get("started_at") or unix(ran_at)
    return from_unix(plan["created_at"]) + (ran_at - from_unix(started))

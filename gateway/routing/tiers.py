"""Pick the tier a request runs on: a pure decision over a :class:`RouteContext`.

- A tier name or a concrete model name pins its tier, if the tenant may use it
  (reason ``pinned``).
- ``model: "auto"`` starts at the tenant's ``default_tier``. Costlier tiers with a
  threshold are candidates; the request is scored by the tenant's difficulty estimator
  and goes to the costliest candidate whose threshold its score reaches (``gate``).
  Budget pressure raises every threshold as the tenant's remaining budget falls
  (``budget``), and a tier with a capacity admits only the hardest share of the tenant's
  recent requests (``capacity``); a demoted request tries the next cheaper candidate.
- The ``X-Joulegate-Max-Tier`` header caps the choice (``capped`` when it lowered it).
- A tier whose backend reports itself saturated (a vLLM queue over its limit) is skipped
  (``load``); among candidates of equal cost, the one predicted to spend the fewest joules
  on this request (its measured joules per token) is tried first.
- Carbon-aware: with ``routing.carbon_weight`` w > 0, tiers of equal cost (the same model
  at several sites, say) are ordered by ``(1 - w) * J / J_max + w * CO2 / CO2_max`` instead,
  where J is the request's predicted joules on the tier and CO2 its grams at the tier's
  site now (``RouteContext.carbon``: grams per joule); the default tier's equal-cost peers
  compete with it the same way. A pick that differs from the joules-only one has reason
  ``carbon``. Difficulty, budget pressure, capacity and load apply as before.

With no candidate above the default tier, nothing is scored (no cost on that path); under
``estimator: cascade`` the request still counts in the tenant's capacity windows, at score 0
(the cascade's escalations are what those windows hold).
A request routing cannot serve raises a :class:`RouteRefusal`; ``gateway.errors`` says
what the client sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise

from backends import GenerationRequest
from policies import AUTO_MODEL, RoutingSpec, TierSpec

from .capacity import CapacityWindow, Entry
from .estimators import Difficulty, DifficultyEstimator

MAX_TIER_HEADER = "x-joulegate-max-tier"


class RouteRefusal(Exception):
    """Routing cannot serve the request as asked."""


class ModelNotFound(RouteRefusal):
    """``model`` names no tier or model this tenant may use (one answer for both, so a
    tenant cannot probe which models others may use)."""

    def __init__(self, model: str, param: str = "model"):
        super().__init__(model)
        self.model, self.param = model, param


class AboveMaxTier(RouteRefusal):
    """The pinned ``model`` costs more than the ``X-Joulegate-Max-Tier`` cap."""

    def __init__(self, model: str, cap: str):
        super().__init__(model)
        self.model, self.cap = model, cap


@dataclass(frozen=True, slots=True)
class Skip:
    """A tier the request passed over, and why: ``gate``, ``capacity``, ``budget``, ``load``,
    ``capped``, or ``failed: <error>``."""

    tier: str
    why: str


@dataclass(slots=True)
class Decision:
    tier: TierSpec
    #: gate, capacity, budget, load, pinned or capped.
    reason: str
    difficulty: Difficulty | None = None
    #: Capacity-window entries of this request, settled with its measured joules.
    entries: list[tuple[CapacityWindow, Entry]] = field(default_factory=list)
    #: Costlier candidates passed over, in the order they were considered.
    skipped: list[Skip] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RouteContext:
    """Everything routing needs beyond the request, as plain data."""

    #: The tenant's tiers, cheapest first, and where ``auto`` starts.
    tiers: tuple[TierSpec, ...]
    default: TierSpec
    routing: RoutingSpec
    estimator: DifficultyEstimator
    #: The tenant's least remaining budget fraction, or None when it has no budget.
    remaining: float | None = None
    #: Tiers whose backend is saturated now (load-aware routing).
    saturated: frozenset[str] = frozenset()
    #: tier → the tenant's capacity window on it (tiers with a capacity only).
    capacity: Mapping[str, CapacityWindow] = field(default_factory=dict)
    #: tier → this request's predicted joules on it (missing: 0).
    joules: Mapping[str, float] = field(default_factory=dict)
    #: Tiers a budget may degrade the request to; None when the tenant rejects instead.
    degrade_ladder: tuple[str, ...] | None = None
    #: tier → grams of CO₂ per predicted joule at its site now (facility overhead included;
    #: missing: 0). Only read when ``routing.carbon_weight`` > 0.
    carbon: Mapping[str, float] = field(default_factory=dict)

    def predict(self, tier: TierSpec) -> float:
        return self.joules.get(tier.name, 0.0)

    def co2(self, tier: TierSpec) -> float:
        """This request's predicted grams of CO₂ on ``tier``."""
        return self.predict(tier) * self.carbon.get(tier.name, 0.0)


def resolve_model(tiers: tuple[TierSpec, ...] | list[TierSpec], model: str,
                  param: str = "model") -> TierSpec:
    """The tier of ``tiers`` (a tenant's) that ``model`` names, by tier or model name."""
    for tier in tiers:
        if tier.name == model:
            return tier
    for tier in reversed(tiers):
        if tier.model == model:
            return tier
    raise ModelNotFound(model, param)


def pressure_raise(curve: list[list[float]], remaining: float | None) -> float:
    """How much to raise thresholds at this remaining budget fraction (piecewise linear
    between the curve's points, flat beyond them)."""
    if remaining is None or not curve:
        return 0.0
    points = sorted((p[0], p[1]) for p in curve)
    if remaining <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in pairwise(points):
        if remaining <= x1:
            return y0 + (y1 - y0) * (remaining - x0) / (x1 - x0)
    return points[-1][1]


def carbon_order(ctx: RouteContext, weight: float) -> dict[str, float]:
    """tier → its place among equal-cost tiers (lower first): predicted joules and grams
    of CO₂, each relative to the largest over the tenant's tiers, weighted by ``weight``."""
    j_max = max((ctx.predict(t) for t in ctx.tiers), default=0.0) or 1.0
    c_max = max((ctx.co2(t) for t in ctx.tiers), default=0.0) or 1.0
    return {t.name: (1 - weight) * ctx.predict(t) / j_max + weight * ctx.co2(t) / c_max
            for t in ctx.tiers}


def _default_peer(ctx: RouteContext, order: dict[str, float],
                  max_tier: TierSpec | None) -> Decision:
    """The default tier, or the equal-cost peer the carbon order prefers (``carbon``)."""
    peers = [t for t in ctx.tiers if t.cost == ctx.default.cost and t.name not in ctx.saturated
             and (max_tier is None or t.cost <= max_tier.cost)]
    best = min(peers, key=lambda t: (order[t.name], t is not ctx.default), default=ctx.default)
    return Decision(best, "gate" if best is ctx.default else "carbon")


def route(ctx: RouteContext, generation: GenerationRequest,
          max_tier: TierSpec | None = None) -> Decision:
    """Choose a tier for an ``auto`` request; see the module docstring."""
    if max_tier is not None and ctx.default.cost > max_tier.cost:
        return Decision(max_tier, "capped")
    thresholds = ctx.routing.thresholds or {}
    weight = ctx.routing.carbon_weight or 0.0
    order = carbon_order(ctx, weight) if weight > 0 else None
    candidates = sorted((t for t in ctx.tiers if t.cost > ctx.default.cost and t.name in thresholds),
                        key=lambda t: (-t.cost, ctx.predict(t) if order is None else order[t.name]))
    if not candidates:
        decision = Decision(ctx.default, "gate") if order is None \
            else _default_peer(ctx, order, max_tier)
        # A cascade escalates past routing's candidates, so its capacity windows need the
        # request anyway; other estimators' windows rank only requests routing could move.
        return _recorded(ctx, decision, 0.0) if ctx.routing.estimator == "cascade" else decision
    difficulty = ctx.estimator.score(generation)
    score = difficulty.score
    gated = next((t for t in candidates if score >= thresholds[t.name]), ctx.default)
    chosen, skipped = ctx.default, []
    for tier in candidates:
        why = _skip(ctx, tier, score, thresholds[tier.name], max_tier)
        if why is None:
            chosen = tier
            break
        skipped.append(Skip(tier.name, why))
    demoted = [s.why for s in skipped if s.why not in ("gate", "capped")]
    reason = "gate" if chosen is gated else demoted[-1] if demoted else "capped"
    if order is not None:
        if chosen is ctx.default:
            peer = _default_peer(ctx, order, max_tier).tier
            if peer is not chosen:
                chosen, reason = peer, "carbon" if reason == "gate" else reason
        elif reason == "gate":
            # Joules only, the first equal-cost tier that could take it would have served.
            energy_first = min((t for t in candidates if t.cost == chosen.cost and _skip(
                ctx, t, score, thresholds[t.name], max_tier) is None), key=ctx.predict)
            if energy_first is not chosen:
                reason = "carbon"
    return _recorded(ctx, Decision(chosen, reason, difficulty, skipped=skipped), score)


def _recorded(ctx: RouteContext, decision: Decision, score: float) -> Decision:
    """``decision``, with the request recorded at ``score`` in every capacity window of the
    tenant, whether or not it uses that window's tier: each counts in the share. Under
    ``estimator: cascade`` a request routing had no candidate to score for is recorded at 0;
    the cascade rescores it once its probe has read it, and its windows decide the
    escalation."""
    for name, window in ctx.capacity.items():
        decision.entries.append((window, window.record(score, decision.tier.name == name,
                                                       ctx.predict(decision.tier))))
    return decision


def _skip(ctx: RouteContext, tier: TierSpec, score: float, threshold: float,
          max_tier: TierSpec | None) -> str | None:
    """Why ``tier`` cannot take a request of this ``score``, or None when it can."""
    if max_tier is not None and tier.cost > max_tier.cost:
        return "capped"
    if score < threshold:
        return "gate"
    if score < threshold + pressure_raise(ctx.routing.pressure or [], ctx.remaining):
        return "budget"
    if tier.name in ctx.saturated:
        return "load"
    window = ctx.capacity.get(tier.name)
    if window is not None and not window.admits(score, ctx.predict(tier)):
        return "capacity"
    return None


def pick_tier(ctx: RouteContext, model: str, generation: GenerationRequest,
              max_tier_name: str | None = None) -> Decision:
    """The tier for one request: pinned by ``model``, or routed when it is ``auto``; raises
    :class:`ModelNotFound` or :class:`AboveMaxTier`."""
    max_tier = None
    if max_tier_name:
        max_tier = resolve_model(ctx.tiers, max_tier_name.strip(), param="X-Joulegate-Max-Tier")
    if model == AUTO_MODEL:
        return route(ctx, generation, max_tier)
    tier = resolve_model(ctx.tiers, model)
    if max_tier is not None and tier.cost > max_tier.cost:
        raise AboveMaxTier(model, max_tier.name)
    return Decision(tier, "pinned")


def tenant_models(tiers: list[TierSpec]) -> list[tuple[str, TierSpec | None]]:
    """``(id, tier)`` for every model id a tenant with these tiers may name: ``auto``, tier
    names, concrete models."""
    out: list[tuple[str, TierSpec | None]] = [(AUTO_MODEL, None)]
    for tier in tiers:
        out.append((tier.name, tier))
        if tier.model != tier.name:
            out.append((tier.model, tier))
    return out

"""Pick the tier a request runs on.

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

With no candidate above the default tier, nothing is scored (no cost on that path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backends import GenerationRequest
from policies import AUTO_MODEL, RoutingSpec, TierSpec

from ..errors import InvalidRequest
from .capacity import CapacityTracker, CapacityWindow, Entry
from .estimators import Difficulty, DifficultyEstimator

if TYPE_CHECKING:
    from ..runtime import Snapshot

MAX_TIER_HEADER = "x-joulegate-max-tier"


@dataclass(slots=True)
class Decision:
    tier: TierSpec
    #: gate, capacity, budget, load, pinned or capped.
    reason: str
    difficulty: Difficulty | None = None
    #: Capacity-window entries to settle with the request's measured joules.
    entries: list[tuple[CapacityWindow, Entry]] = field(default_factory=list)

    def settle(self, joules: float) -> None:
        for window, entry in self.entries:
            window.settle(entry, joules)


def resolve_model(tiers: dict[str, TierSpec], models: dict[str, TierSpec], allowed: list[str] | None,
                  model: str, param: str = "model") -> TierSpec:
    tier = tiers.get(model) or models.get(model)
    if tier is None or (allowed is not None and tier.name not in allowed):
        # One answer for both, so a tenant cannot probe which models others may use.
        raise InvalidRequest(f"the model '{model}' does not exist or you may not use it; "
                             "GET /v1/models lists yours", param=param, code="model_not_found")
    return tier


def pressure_raise(curve: list[list[float]], remaining: float | None) -> float:
    """How much to raise thresholds at this remaining budget fraction (piecewise linear
    between the curve's points, flat beyond them)."""
    if remaining is None or not curve:
        return 0.0
    points = sorted((p[0], p[1]) for p in curve)
    if remaining <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if remaining <= x1:
            return y0 + (y1 - y0) * (remaining - x0) / (x1 - x0)
    return points[-1][1]


@dataclass(frozen=True, slots=True)
class RouteContext:
    """What routing needs beyond the request: the policy view for this tenant."""

    tenant: str
    tiers: list[TierSpec]            # the tenant's tiers, cheapest first
    default: TierSpec
    routing: RoutingSpec
    estimator: DifficultyEstimator
    #: The tenant's least remaining budget fraction, or None when it has no budget.
    remaining: float | None
    #: Whether a tier's backend is saturated now (load-aware routing).
    saturated: Callable[[TierSpec], bool] = lambda tier: False


def route(ctx: RouteContext, generation: GenerationRequest, capacity: CapacityTracker,
          predict_joules, max_tier: TierSpec | None = None) -> Decision:
    """Choose a tier for an ``auto`` request; see the module docstring."""
    if max_tier is not None and ctx.default.cost > max_tier.cost:
        return Decision(max_tier, "capped")
    thresholds = ctx.routing.thresholds or {}
    candidates = sorted((t for t in ctx.tiers if t.cost > ctx.default.cost and t.name in thresholds),
                        key=lambda t: (-t.cost, predict_joules(t)))
    if not candidates:
        return Decision(ctx.default, "gate")
    difficulty = ctx.estimator.score(generation)
    score = difficulty.score
    gated = next((t for t in candidates if score >= thresholds[t.name]), ctx.default)
    lift = pressure_raise(ctx.routing.pressure or [], ctx.remaining)
    chosen, reason = ctx.default, "gate"
    for tier in candidates:
        if max_tier is not None and tier.cost > max_tier.cost:
            continue
        if score < thresholds[tier.name]:
            continue
        if score < thresholds[tier.name] + lift:
            reason = "budget"
            continue
        if ctx.saturated(tier):
            reason = "load"
            continue
        spec = (ctx.routing.capacity or {}).get(tier.name)
        if spec is not None and not capacity.window(ctx.tenant, tier.name, spec).admits(
                score, predict_joules(tier)):
            reason = "capacity"
            continue
        chosen = tier
        break
    if chosen is gated:
        reason = "gate"
    elif reason == "gate":  # lowered by nothing but the cap
        reason = "capped"
    decision = Decision(chosen, reason, difficulty)
    joules = predict_joules(chosen)
    for name, spec in (ctx.routing.capacity or {}).items():
        window = capacity.window(ctx.tenant, name, spec)
        decision.entries.append((window, window.record(score, chosen.name == name, joules)))
    return decision


def pin(tiers: dict[str, TierSpec], models: dict[str, TierSpec], allowed: list[str] | None,
        model: str, max_tier: TierSpec | None) -> Decision:
    tier = resolve_model(tiers, models, allowed, model)
    if max_tier is not None and tier.cost > max_tier.cost:
        raise InvalidRequest(f"the model '{model}' is above the tier cap '{max_tier.name}' set by "
                             "X-Joulegate-Max-Tier", param="model", code="above_max_tier")
    return Decision(tier, "pinned")


def fallback_tier(snap: Snapshot, tenant: str, decision: Decision,
                  tried: list[TierSpec]) -> TierSpec | None:
    """The tier to retry on after ``tried[-1]`` could not take the request, or None."""
    routing = snap.routing[tenant]
    mode = routing.fallback or "off"
    if mode == "off" or (decision.reason == "pinned" and mode != "all"):
        return None
    allowed = [t.name for t in snap.policy.tenant_tiers(tenant)]
    ladder = routing.fallback_ladder or list(reversed(allowed))
    current = tried[-1].name
    after = ladder[ladder.index(current) + 1:] if current in ladder else ladder
    done = {t.name for t in tried}
    for name in after:
        if name in allowed and name not in done:
            return snap.tiers[name]
    return None


def tenant_models(snap: Snapshot, tenant: str) -> list[tuple[str, TierSpec | None]]:
    """``(id, tier)`` for every model id the tenant may name: ``auto``, tiers, concrete models."""
    out: list[tuple[str, TierSpec | None]] = [(AUTO_MODEL, None)]
    for tier in snap.policy.tenant_tiers(tenant):
        out.append((tier.name, tier))
        if tier.model != tier.name:
            out.append((tier.model, tier))
    return out


def pick_tier(snap: Snapshot, tenant: str, model: str, generation: GenerationRequest,
              max_tier_name: str | None, capacity: CapacityTracker,
              remaining: float | None, predict_joules) -> Decision:
    """The tier for one request, from the snapshot's policy (see the module docstring)."""
    spec = snap.policy.tenants[tenant]
    max_tier = None
    if max_tier_name:
        max_tier = resolve_model(snap.tiers, snap.models, spec.tiers, max_tier_name.strip(),
                                 param="X-Joulegate-Max-Tier")
    if model != AUTO_MODEL:
        return pin(snap.tiers, snap.models, spec.tiers, model, max_tier)
    routing = snap.routing[tenant]
    ctx = RouteContext(tenant, snap.policy.tenant_tiers(tenant), snap.tiers[spec.default_tier],
                       routing, snap.estimators[routing.estimator or "learned"],
                       remaining if spec.budgets else None,
                       saturated=lambda tier: snap.backend_for(tier).saturated())
    return route(ctx, generation, capacity, predict_joules, max_tier)

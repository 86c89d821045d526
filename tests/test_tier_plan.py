"""The tier plan: built once from the route decision, moved by a budget degrade or a
failure, and always charging capacity to the tier in force."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.routing import (
    AboveMaxTier,
    CapacityTracker,
    ModelNotFound,
    TierPlan,
    pick_tier,
)
from gateway.routing.tiers import RouteContext
from policies import CapacitySpec, RoutingSpec

from .test_routing import TIERS, FixedScore, chat

pytestmark = pytest.mark.unit


def context(score: float, degrade=("small", "mid", "big"), **routing) -> RouteContext:
    spec = RoutingSpec(thresholds={"mid": 0.4, "big": 0.8}, fallback="auto", **routing)
    windows = {n: CapacityTracker().window("t", n, c) for n, c in (spec.capacity or {}).items()}
    return RouteContext(tuple(TIERS), TIERS[0], spec, FixedScore(score), capacity=windows,
                        degrade_ladder=degrade)


def plan_for(ctx: RouteContext, model: str = "auto", max_tier: str | None = None) -> TierPlan:
    return TierPlan.route(ctx, pick_tier(ctx, model, chat("x"), max_tier))


def test_the_plan_lists_the_routed_tier_then_its_alternatives_and_why_tiers_were_skipped():
    plan = plan_for(context(0.5))
    assert [c.tier.name for c in plan.candidates] == ["mid", "small"]
    assert [(s.tier, s.why) for s in plan.skipped] == [("big", "gate")]
    assert plan.reason == "gate" and [t.name for t in plan.degrade_options()] == ["small"]


def test_a_degrade_moves_the_plan_and_the_capacity_entry_to_the_cheaper_tier():
    ctx = context(0.95, capacity={"big": CapacitySpec(fraction=0.5)})
    plan = plan_for(ctx)
    assert plan.tier.name == "big" and ctx.capacity["big"].fraction() == 1.0
    plan.degrade(plan.degrade_options()[0])
    assert (plan.tier.name, plan.reason, plan.degraded_from) == ("mid", "budget", "big")
    assert ctx.capacity["big"].fraction() == 0.0
    assert plan.degrade_options() == []  # a budget decides once, on the routed tier


def test_a_failure_falls_back_down_the_ladder_once_per_tier():
    ctx = context(0.95, capacity={"big": CapacitySpec(fraction=0.5)})
    plan = plan_for(ctx)
    assert plan.attempt().name == "big"
    assert plan.fall_back("down").name == "mid"
    assert plan.attempt().name == "mid"
    assert plan.fall_back("timed out").name == "small"
    plan.attempt()
    assert plan.fall_back("down") is None and plan.tier.name == "small"
    assert [(s.tier, s.why) for s in plan.skipped] == [("big", "failed: down"),
                                                       ("mid", "failed: timed out")]
    assert plan.reason == "fallback" and [t.name for t in plan.attempts] == ["big", "mid", "small"]
    assert ctx.capacity["big"].fraction() == 0.0


def test_after_a_degrade_a_failure_continues_below_the_degraded_tier():
    plan = plan_for(context(0.95))
    plan.degrade(TIERS[1])
    plan.attempt()
    assert plan.fall_back("down").name == "small"


def test_a_pinned_request_falls_back_only_when_the_policy_says_all():
    plan = plan_for(context(0.1), model="big")
    plan.attempt()
    assert plan.reason == "pinned" and plan.fall_back("down") is None
    ctx = dataclasses.replace(context(0.1), routing=RoutingSpec(fallback="all"))
    plan = plan_for(ctx, model="big")
    plan.attempt()
    assert plan.fall_back("down").name == "mid"


def test_a_tenant_that_rejects_has_no_degrade_options():
    assert plan_for(context(0.95, degrade=None)).degrade_options() == []


def test_refusals_are_typed():
    with pytest.raises(ModelNotFound) as missing:
        plan_for(context(0.1), max_tier="huge")
    assert missing.value.param == "X-Joulegate-Max-Tier"
    with pytest.raises(AboveMaxTier) as above:
        plan_for(context(0.1), model="g", max_tier="mid")
    assert (above.value.model, above.value.cap) == ("g", "mid")
    with pytest.raises(ModelNotFound):  # not one of the tenant's tiers
        pick_tier(dataclasses.replace(context(0.1), tiers=tuple(TIERS[:2])), "big", chat("x"))

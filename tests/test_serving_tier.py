"""One tier plan per request: when a budget degrade or a fallback moves a request off the
tier routing chose, capacity windows, route metrics, headers, the access log and the
answer all name the tier that served it, not the one first chosen.

A real gateway process on the fast fake upstream (tests/fake_upstream.py), priced per
token: `big` 2 J/token, `small` 1 J/token.
"""

from __future__ import annotations

import time

import pytest

from .conftest import access_records, free_port, priced_policy
from .test_routing_e2e import HARD, ask, metric

pytestmark = pytest.mark.e2e

#: `big` for hard prompts, and at most half of the tenant's routed requests on it (the
#: first request of a young window is always admitted).
ROUTING = {"estimator": "heuristic", "thresholds": {"big": 0.45},
           "capacity": {"big": {"fraction": 0.5, "window_s": 600}}}


def _served_small(gw, headers, reply) -> dict:
    """The request was answered by `small`; its access record."""
    assert headers["x-joulegate-tier"] == "small" and reply.model == "small-model"
    assert reply.usage.model_extra["energy_joules"] > 0
    assert metric(gw, "joulegate_route_decisions_total", tenant="acme", tier="big") == 0
    assert metric(gw, "joulegate_capacity_fraction", tenant="acme", tier="big") == 0
    assert metric(gw, "joulegate_energy_joules_total", tenant="acme", tier="small") > 0
    assert metric(gw, "joulegate_energy_joules_total", tenant="acme", tier="big") == 0
    deadline = time.monotonic() + 10
    while not (records := access_records(gw.log_path.read_text())):
        assert time.monotonic() < deadline, "no access record"
        time.sleep(0.05)
    (record,) = records
    assert record["tier"] == "small" and record["status"] == 200
    return record


def test_a_fallback_charges_capacity_and_metrics_to_the_tier_that_answered(upstream, gateways):
    policy = priced_policy(upstream.url, {"default_tier": "small"})
    policy["routing"] = ROUTING
    policy["backends"]["up-big"]["base_url"] = f"http://127.0.0.1:{free_port()}/v1"  # down
    gw = gateways(policy)
    headers, reply = ask(gw.client(), HARD)
    assert headers["x-joulegate-fallback"] == "big->small"
    assert float(headers["x-joulegate-difficulty"]) >= 0.45  # routing chose big
    assert metric(gw, "joulegate_route_decisions_total", tenant="acme", tier="small",
                  reason="fallback") == 1
    record = _served_small(gw, headers, reply)
    assert record["fallback_from"] == ["big"] and record["degraded_from"] is None


def test_a_budget_degrade_charges_capacity_and_metrics_to_the_tier_that_answered(
        upstream, gateways):
    # HARD is ~270 prompt tokens: about 560 J predicted on big, 280 J on small.
    policy = priced_policy(upstream.url, {"default_tier": "small",
                                          "budgets": [{"window": "1d", "joules": 400}]})
    policy["routing"] = {**ROUTING, "pressure": [[0.0, 0.0]]}
    gw = gateways(policy)
    headers, reply = ask(gw.client(), HARD)
    assert headers["x-joulegate-degraded"] == "big->small"
    assert float(headers["x-joulegate-difficulty"]) >= 0.45  # routing chose big
    assert metric(gw, "joulegate_route_decisions_total", tenant="acme", tier="small",
                  reason="budget") == 1
    assert metric(gw, "joulegate_budget_degradations_total", tenant="acme",
                  **{"from": "big", "to": "small"}) == 1
    record = _served_small(gw, headers, reply)
    assert record["degraded_from"] == "big" and record["fallback_from"] == []

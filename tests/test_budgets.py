"""Joule budgets end to end: reject, degrade, soft warning, admin API, Redis, crashes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import httpx
import pytest

from gateway.budgets import Limit
from gateway.budgets.redis_ledger import RedisLedger

from .conftest import (
    ADMIN_KEY,
    KEYS,
    FakeUpstream,
    Gateway,
    RedisServer,
    priced_policy,
    wait_until,
)

pytestmark = pytest.mark.e2e

# 32 characters: estimated at 12 prompt tokens, the fake upstream's fixed count, so the
# predicted joules equal the measured ones (48 J on big, 24 J on small).
HI = [{"role": "user", "content": "Say hello in one short sentence."}]


def ask(gw: Gateway, model: str = "big", who: str = "acme") -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {KEYS[who]}"},
                      json={"model": model, "messages": HI, "max_tokens": 12})


def admin(gw: Gateway, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{gw.url}/admin/tenants{path}", timeout=30,
                         headers={"authorization": f"Bearer {ADMIN_KEY}"}, **kw)


@pytest.fixture
def gateway_for(upstream, gateways):
    """Starts gateways with budgets for tenant acme on the priced tiers; stops them after."""
    def make(tenant_extra: dict, ledger: dict | None = None) -> Gateway:
        return gateways(priced_policy(upstream.url, tenant_extra, ledger))

    return make


def test_reject_with_retry_after_and_exact_spend(gateway_for):
    gw = gateway_for({"budgets": [{"window": "1d", "joules": 100}], "on_exhausted": "reject"})
    spent = 0.0
    for _ in range(2):
        resp = ask(gw)
        assert resp.status_code == 200 and resp.headers["x-joulegate-tier"] == "big"
        spent += resp.json()["usage"]["energy_joules"]
    assert spent == pytest.approx(96.0)  # 2 x (12 + 12 tokens x 2 J)
    refused = ask(gw)
    assert refused.status_code == 429
    err = refused.json()["error"]
    assert err["code"] == "budget_exhausted" and err["type"] == "rate_limit_error"
    assert "tenant 'acme'" in err["message"] and "1d window" in err["message"]
    assert "4.0 J left" in err["message"]
    assert 0 < int(refused.headers["retry-after"]) <= 86400
    assert ask(gw, who="globex").status_code == 200  # other tenants are not affected
    body = admin(gw, "GET", "/acme/budget").json()
    (window,) = body["windows"]
    assert window["spent_joules"] == pytest.approx(spent) and window["reserved_joules"] == 0
    assert window["remaining_joules"] == pytest.approx(4.0)
    gauge = 'joulegate_budget_remaining_joules{tenant="acme",window="1d"} 4.0'
    wait_until(lambda: gauge in httpx.get(f"{gw.url}/metrics").text, 5, 0.2, "gauge refresh")
    assert 'joulegate_budget_reserved_joules{tenant="acme"} 0.0' in httpx.get(f"{gw.url}/metrics").text


def test_degrade_to_a_cheaper_tier_then_reject(gateway_for):
    gw = gateway_for({"budgets": [{"window": "1d", "joules": 130, "soft_pct": 50}],
                      "on_exhausted": "degrade"})
    first = ask(gw)
    assert first.status_code == 200 and "x-joulegate-degraded" not in first.headers
    second = ask(gw)
    assert second.headers["x-joulegate-tier"] == "big"
    assert second.headers["x-joulegate-budget-warning"].startswith("1d=")
    third = ask(gw)  # 96 J spent: big (~48 J) no longer fits, small (24 J) does
    assert third.status_code == 200
    assert third.headers["x-joulegate-degraded"] == "big->small"
    assert third.headers["x-joulegate-tier"] == "small" and third.json()["model"] == "small-model"
    assert third.json()["usage"]["energy_joules"] == pytest.approx(24.0)
    assert ask(gw).status_code == 429  # 120 J spent: not even small fits in 130
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert 'joulegate_budget_degradations_total{from="big",tenant="acme",to="small"} 1.0' in metrics
    assert 'joulegate_budget_rejections_total{reason="exhausted",tenant="acme"} 1.0' in metrics
    assert 'joulegate_budget_remaining_joules{tenant="acme",window="1d"}' in metrics


def test_admin_api_grant_reset_and_errors(gateway_for):
    gw = gateway_for({"budgets": [{"window": "1d", "joules": 50}, {"window": "1h", "joules": 60}],
                      "on_exhausted": "reject"})
    assert ask(gw).status_code == 200
    assert ask(gw).status_code == 429
    assert admin(gw, "POST", "/acme/budget/grant", json={"window": "1d", "joules": 100}).status_code == 200
    assert ask(gw).status_code == 429  # the 1h window still binds
    admin(gw, "POST", "/acme/budget/grant", json={"window": "1h", "joules": 100})
    assert ask(gw).status_code == 200
    assert admin(gw, "POST", "/acme/budget/reset", json={}).status_code == 400  # never "all"
    assert admin(gw, "POST", "/acme/budget/reset", json={"all": True}).status_code == 200
    windows = admin(gw, "GET", "/acme/budget").json()["windows"]
    assert [(w["spent_joules"], w["granted_joules"]) for w in windows] == [(0, 0), (0, 0)]
    assert admin(gw, "POST", "/acme/budget/grant", json={"window": "7d", "joules": 1}).status_code == 400
    assert admin(gw, "POST", "/acme/budget/grant", json={"window": "1d", "joules": -1}).status_code == 400
    assert admin(gw, "GET", "/nobody/budget").status_code == 404
    no_key = httpx.get(f"{gw.url}/admin/tenants/acme/budget")
    assert no_key.status_code == 401
    tenant_key = httpx.get(f"{gw.url}/admin/tenants/acme/budget",
                           headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert tenant_key.status_code == 401


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


async def _status(url: str, tenant: str, limits: list[Limit]):
    ledger = RedisLedger(url)
    try:
        return await ledger.status(tenant, limits)
    finally:
        await ledger.close()


def test_race_three_gateways_one_redis(tmp_path, upstream, redis_server):
    """300 concurrent requests from one tenant through 3 gateway processes sharing Redis,
    against a budget that fits ~50 of them."""
    budget = 1200.0  # 50 x 24 J on the small tier
    policy = priced_policy(upstream.url, {"budgets": [{"window": "1d", "joules": budget}],
                                          "on_exhausted": "reject"},
                           {"kind": "redis", "url": redis_server.url})
    gateways = []
    for n in range(3):
        work = tmp_path / f"gw{n}"
        work.mkdir()
        policy["state_dir"] = str(work / "state")
        gateways.append(Gateway(policy, work).start())
    try:
        async def fire():
            limits = httpx.Limits(max_connections=400)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                async def one(i):
                    return await client.post(
                        f"{gateways[i % 3].url}/v1/chat/completions",
                        headers={"authorization": f"Bearer {KEYS['acme']}"},
                        json={"model": "small", "messages": HI, "max_tokens": 12})
                return await asyncio.gather(*(one(i) for i in range(300)))

        responses = asyncio.run(fire())
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429}, [r.text for r in responses if r.status_code not in (200, 429)][:3]
        served = [r.json()["usage"]["energy_joules"] for r in responses if r.status_code == 200]
        assert 40 <= len(served) <= 50
        (state,) = asyncio.run(_status(redis_server.url, "acme", [Limit("1d", budget)]))
        assert state.reserved == 0  # no reservation left behind
        assert state.spent == pytest.approx(sum(served), abs=1e-6 * len(served))
        assert state.spent <= budget + 24.0  # at most one request's prediction error over
    finally:
        for gw in gateways:
            gw.stop()


def test_crashed_gateway_reservation_returns(tmp_path, redis_server):
    slow = FakeUpstream(delay_ms=5000)
    policy = priced_policy(slow.url, {"budgets": [{"window": "1d", "joules": 1000}]},
                           {"kind": "redis", "url": redis_server.url, "reservation_ttl_s": 2})
    policy["state_dir"] = str(tmp_path / "state")
    gw = Gateway(policy, tmp_path).start()
    limits = [Limit("1d", 1000)]
    try:
        with httpx.Client(timeout=30) as client, contextlib.suppress(httpx.ReadTimeout):
            client.post(f"{gw.url}/v1/chat/completions", timeout=0.8,
                        headers={"authorization": f"Bearer {KEYS['acme']}"},
                        json={"model": "big", "messages": HI, "max_tokens": 12})
        (held,) = asyncio.run(_status(redis_server.url, "acme", limits))
        assert held.reserved > 0
        os.killpg(gw.proc.pid, signal.SIGKILL)  # the gateway dies mid-request
        gw.proc.wait()
        wait_until(lambda: asyncio.run(_status(redis_server.url, "acme", limits))[0].reserved == 0,
                   10, 0.5, "the reservation to expire")
        (state,) = asyncio.run(_status(redis_server.url, "acme", limits))
        assert state.spent == 0 and state.remaining == 1000
    finally:
        gw.stop()
        slow.stop()


def test_redis_down_fail_closed_and_fail_open(tmp_path, upstream, redis_server):
    budgets = {"budgets": [{"window": "1d", "joules": 1000}]}
    closed = priced_policy(upstream.url, budgets, {"kind": "redis", "url": redis_server.url})
    closed["state_dir"] = str(tmp_path / "s1")
    opened = priced_policy(upstream.url, budgets, {"kind": "redis", "url": redis_server.url,
                                                   "on_unavailable": "fail_open"})
    opened["state_dir"] = str(tmp_path / "s2")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    gw_closed = Gateway(closed, tmp_path / "a").start()
    gw_open = Gateway(opened, tmp_path / "b").start()
    try:
        redis_server.stop()
        refused = ask(gw_closed)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "ledger_unavailable"
        assert ask(gw_closed, who="globex").status_code == 200  # unbudgeted tenants still served
        served = [ask(gw_open) for _ in range(3)]
        assert all(r.status_code == 200 for r in served)
        redis_server.start()  # back on the same port: the spend made meanwhile is recorded
        total = sum(r.json()["usage"]["energy_joules"] for r in served)
        wait_until(lambda: asyncio.run(_status(redis_server.url, "acme", [Limit("1d", 1000)]))[0]
                   .spent == pytest.approx(total), 15, 0.5, "fail-open spend to reconcile")
    finally:
        gw_closed.stop()
        gw_open.stop()

"""Joule budgets in-process: a reservation while a request runs, settled with exactly the
joules reported to the client; 400 for a request no window can ever hold, 429 with
Retry-After for one that fits later; degrading to a cheaper tier; the injected default
max_tokens. Tier ``big`` costs 2 J per token, ``small`` 1 J (prompt and output alike)."""

from __future__ import annotations

import asyncio
import time

import pytest

from .inprocess import InProcessGateway, joules, policy, sse_events
from .scripted import Script

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

# 32 characters: estimated at 32 // 4 + 4 = 12 prompt tokens, and the scripts report 12.
HI = "Say hello in one short sentence."
TWELVE = Script(tokens=["tok"] * 12, prompt_tokens=12)


def budget_policy(joules_: float, **tenant) -> dict:
    return policy({"budgets": [{"window": "1d", "joules": joules_}], **tenant})


async def started(gw: InProcessGateway, **fields) -> asyncio.Future:
    """A chat request on tier ``big``, once its scripted backend is generating it."""
    running = asyncio.ensure_future(gw.chat(model="big", content=HI, **fields))
    backend = gw.backends["up-big"]
    for _ in range(200):
        if backend.active:
            break
        await asyncio.sleep(0.005)
    assert backend.active == 1
    return running


async def test_reserved_while_running_and_settled_with_exactly_the_reported_joules(tmp_path):
    slow = Script(tokens=["a", "b", "c"], prompt_tokens=12, token_delay_s=0.05)
    scripts = {"up-big": [slow, Script(tokens=["x"] * 5, prompt_tokens=9),
                          Script(tokens=["y"] * 7, prompt_tokens=4)]}
    async with InProcessGateway(tmp_path, budget_policy(10_000), scripts) as gw:
        running = await started(gw, max_tokens=12)
        window = (await gw.budget())["1d"]
        # Predicted from the tier's seeds: (12 estimated prompt + 12 max_tokens) x 2 J.
        assert window["reserved_joules"] == pytest.approx(48.0)
        assert window["spent_joules"] == 0
        first = (await running).json()["usage"]["energy_joules"]
        assert first == joules(12, 3, "big")

        second = (await gw.chat(model="big", content=HI, max_tokens=12)).json()
        third = sse_events((await gw.chat(model="big", content=HI, max_tokens=12, stream=True,
                                          stream_options={"include_usage": True})).text)
        reported = [first, second["usage"]["energy_joules"], third[-2]["usage"]["energy_joules"]]
        assert reported == [joules(12, 3, "big"), joules(9, 5, "big"), joules(4, 7, "big")]
        window = (await gw.budget())["1d"]
        assert window["spent_joules"] == pytest.approx(sum(reported), abs=1e-6)
        assert window["reserved_joules"] == 0
        assert window["remaining_joules"] == pytest.approx(10_000 - sum(reported), abs=1e-6)
        assert await gw.metric("joulegate_energy_joules_total", tenant="acme") == \
            pytest.approx(sum(reported), abs=1e-6)


async def test_a_request_larger_than_the_window_is_400_without_retry_after(tmp_path):
    async with InProcessGateway(tmp_path, budget_policy(100, on_exhausted="reject"),
                                {"up-big": TWELVE}) as gw:
        # 12 x 2 J + 100 x 2 J = 224 J > the whole 100 J window
        r = await gw.chat(model="big", content=HI, max_tokens=100)
        assert r.status_code == 400 and "retry-after" not in r.headers
        err = r.json()["error"]
        assert err["code"] == "budget_exceeds_window" and err["param"] == "max_tokens"
        assert err["type"] == "invalid_request_error"
        # (100 J - 12 x 2 J) / 2 J per output token = 38
        assert "largest max_tokens that fits is 38" in err["message"]
        assert "1d window" in err["message"]
        assert gw.backends["up-big"].requests == []
        assert await gw.metric("joulegate_budget_rejections_total", tenant="acme",
                               reason="exceeds_window") == 1
        window = (await gw.budget())["1d"]
        assert window["spent_joules"] == 0 and window["reserved_joules"] == 0

        ok = await gw.chat(model="big", content=HI, max_tokens=38)  # what the message names
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 12


async def test_a_request_that_fits_later_is_429_with_retry_after_at_the_window_end(tmp_path):
    async with InProcessGateway(tmp_path, budget_policy(100, on_exhausted="reject"),
                                {"up-big": TWELVE}) as gw:
        for _ in range(2):  # 2 x (12 + 12 tokens x 2 J) = 96 J spent
            assert (await gw.chat(model="big", content=HI, max_tokens=12)).status_code == 200
        assert (await gw.budget())["1d"]["spent_joules"] == pytest.approx(96)
        r = await gw.chat(model="big", content=HI, max_tokens=12)
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["code"] == "budget_exhausted" and "4.0 J left" in err["message"]
        day_end = (int(time.time()) // 86400 + 1) * 86400  # the 1d window is a UTC day
        assert abs(int(r.headers["retry-after"]) - (day_end - time.time())) <= 5
        assert len(gw.backends["up-big"].requests) == 2
        assert await gw.metric("joulegate_budget_rejections_total", tenant="acme",
                               reason="exhausted") == 1
        # A refused stream is refused the same way, before any event.
        s = await gw.chat(model="big", content=HI, max_tokens=12, stream=True)
        assert s.status_code == 429 and s.json()["error"]["code"] == "budget_exhausted"
        # Another tenant's budget is its own.
        assert (await gw.chat(who="globex", model="big", content=HI)).status_code == 200


async def test_degrade_moves_to_the_cheaper_tier_that_fits(tmp_path):
    scripts = {"up-big": TWELVE, "up-small": TWELVE}
    async with InProcessGateway(tmp_path, budget_policy(80), scripts) as gw:
        first = await gw.chat(model="big", content=HI, max_tokens=12)  # 48 J reserved, spent
        assert first.headers["x-joulegate-tier"] == "big"
        assert "x-joulegate-degraded" not in first.headers
        # 32 J left: big needs 48, small needs (12 + 12) x 1 = 24.
        second = await gw.chat(model="big", content=HI, max_tokens=12)
        assert second.status_code == 200, second.text
        assert second.headers["x-joulegate-tier"] == "small"
        assert second.headers["x-joulegate-degraded"] == "big->small"
        assert second.json()["model"] == "small-model"
        assert second.json()["usage"]["energy_joules"] == joules(12, 12, "small")
        assert len(gw.backends["up-small"].requests) == 1
        assert await gw.metric("joulegate_budget_degradations_total", tenant="acme") == 1
        assert (await gw.budget())["1d"]["spent_joules"] == pytest.approx(48 + 24)
        # 8 J left: nothing fits now, but a day's window frees: 429.
        third = await gw.chat(model="big", content=HI, max_tokens=12)
        assert third.status_code == 429


async def test_an_injected_default_max_tokens_is_announced_and_passed_on(tmp_path):
    p = budget_policy(1000, default_max_tokens=16)
    async with InProcessGateway(tmp_path, p) as gw:
        r = await gw.chat(model="big", content=HI)
        assert r.headers["x-joulegate-default-max-tokens"] == "16"
        assert gw.backends["up-big"].requests[-1].max_tokens == 16
        r = await gw.chat(model="big", content=HI, max_tokens=12)
        assert "x-joulegate-default-max-tokens" not in r.headers
        assert gw.backends["up-big"].requests[-1].max_tokens == 12


async def test_every_admission_updates_the_remaining_fraction_that_routing_reads(tmp_path):
    """Budget pressure reads the tenant's remaining fraction; an admission refreshes it every
    time, also when it leaves the budget gauges for the next refresh (they are set at most
    every 0.25 s by admissions, and every second by the reconcile loop)."""
    scripts = {"up-big": [Script(tokens=["t"] * 12, prompt_tokens=12) for _ in range(3)]}
    async with InProcessGateway(tmp_path, budget_policy(1_000), scripts) as gw:
        guard = gw.runtime.guard
        seen = []
        for _ in range(3):
            assert (await gw.chat(model="big", content=HI, max_tokens=12)).status_code == 200
            seen.append(guard.remaining_fraction("acme"))
        # each admission reserved 48 J on top of what the earlier requests spent (48 J each)
        assert seen == pytest.approx([1 - 48 / 1000, 1 - 96 / 1000, 1 - 144 / 1000])


async def test_no_more_output_is_held_than_the_tiers_context_window(tmp_path):
    # Clients send max_tokens far past any local model's window (32k, or a million); no
    # answer can be longer than the window, so holding for max_tokens refused requests that
    # fit (400 "can never be served", or 429 while the budget was far from spent).
    slow = Script(tokens=["a", "b"], prompt_tokens=12, token_delay_s=0.05)
    async with InProcessGateway(tmp_path, budget_policy(500), {"up-big": slow}) as gw:
        backend = gw.backends["up-big"]
        backend.window = 64
        running = await started(gw, max_tokens=1_000_000)
        # (12 estimated prompt + 64 of the window) x 2 J, not (12 + 1,000,000) x 2 J
        assert (await gw.budget())["1d"]["reserved_joules"] == pytest.approx(152.0)
        r = await running
        assert r.status_code == 200 and r.json()["usage"]["energy_joules"] == joules(12, 2, "big")
        assert backend.requests[0].max_tokens == 1_000_000  # the request itself is as asked
        # Without a known window the hold is max_tokens', which no window of 500 J holds.
        backend.window = None
        r = await gw.chat(model="big", content=HI, max_tokens=1_000_000)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"

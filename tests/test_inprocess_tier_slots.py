"""A tier holds at most ``server.limits.max_pending_per_tier`` requests at once: past it the
plan moves on as when the tier's backend is unavailable, and with nowhere to go the answer is
503 ``tier_queue_full`` with Retry-After. Places are given back however a request ends."""

from __future__ import annotations

import asyncio

import pytest

from .inprocess import InProcessGateway, chat_body, policy, until
from .scripted import Script

pytestmark = [pytest.mark.unit, pytest.mark.anyio]


def capped_policy(**routing) -> dict:
    p = policy(server={"limits": {"max_pending_per_tier": 1}})
    if routing:
        p["routing"] = routing
    return p


async def test_a_full_tier_refuses_with_503_and_frees_its_place_afterwards(tmp_path):
    slow = Script(tokens=["a", "b"], token_delay_s=0.3)
    async with InProcessGateway(tmp_path, capped_policy(fallback="off"),
                                scripts={"up-big": [slow, Script()]}) as gw:
        held = asyncio.create_task(gw.post("/v1/chat/completions", chat_body()))
        await until(lambda: gw.runtime.tier_slots.held("big") == 1, "big's place taken")
        refused = await gw.post("/v1/chat/completions", chat_body())
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        err = refused.json()["error"]
        assert err["code"] == "tier_queue_full" and "max_pending_per_tier" in err["message"]
        assert (await held).status_code == 200
        assert gw.runtime.tier_slots.held("big") == 0
        assert (await gw.post("/v1/chat/completions", chat_body())).status_code == 200
        assert len(gw.backends["up-big"].requests) == 2  # the refused one never reached it
        # Nothing was reserved or spent for the refused request (the tenant is unbudgeted),
        # and it is counted as a 503 on the tier it asked for.
        assert await gw.metric("joulegate_requests_total", tenant="acme", tier="big",
                               status="503") == 1


async def test_a_full_tier_hands_the_request_to_the_next_tier(tmp_path):
    slow = Script(tokens=["a", "b"], token_delay_s=0.3)
    async with InProcessGateway(tmp_path, capped_policy(fallback="all"),
                                scripts={"up-big": [slow]}) as gw:
        held = asyncio.create_task(gw.post("/v1/chat/completions", chat_body()))
        await until(lambda: gw.runtime.tier_slots.held("big") == 1, "big's place taken")
        moved = await gw.post("/v1/chat/completions", chat_body())
        assert moved.status_code == 200
        assert moved.headers["x-joulegate-tier"] == "small"
        assert moved.headers["x-joulegate-fallback"] == "big->small"
        await held
        assert gw.runtime.tier_slots.held("big") == gw.runtime.tier_slots.held("small") == 0


async def test_a_stream_holds_its_place_until_it_ends(tmp_path):
    async with InProcessGateway(tmp_path, capped_policy(fallback="off"),
                                scripts={"up-big": [Script(tokens=["x"] * 3, token_delay_s=0.2)]}
                                ) as gw:
        streamed = asyncio.create_task(gw.post("/v1/chat/completions", chat_body(stream=True)))
        await until(lambda: gw.runtime.tier_slots.held("big") == 1, "big's place taken")
        assert (await gw.post("/v1/chat/completions", chat_body())).status_code == 503
        done = await streamed
        assert done.status_code == 200 and done.text.rstrip().endswith("data: [DONE]")
        assert gw.runtime.tier_slots.held("big") == 0

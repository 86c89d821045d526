"""Routing in-process: pins, `auto` with difficulty thresholds, the max-tier header, and
fallback down the ladder when a tier cannot answer before its first token."""

from __future__ import annotations

import asyncio

import pytest

from backends import FeatureUnsupported

from .inprocess import ADMIN, InProcessGateway, joules, policy, sse_events
from .scripted import Script

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

EASY = "Say hello in one short sentence."
HARD = ("Prove step by step that the algorithm below terminates, then derive its worst-case "
        "complexity and compare it with a heap-based design. Statement 1 | every call shrinks "
        "the input. Statement 2 | the loop invariant holds after each iteration.\n"
        "```python\ndef f(xs):\n    return sorted(xs)[::2]\n```\n" + "Consider the edge cases. " * 30)


def routed_policy(**routing) -> dict:
    p = policy({"default_tier": "small"})
    p["routing"] = {"estimator": "heuristic", "thresholds": {"big": 0.45}, **routing}
    return p


async def test_auto_sends_easy_prompts_to_small_and_hard_ones_to_big(tmp_path):
    async with InProcessGateway(tmp_path, routed_policy()) as gw:
        easy = await gw.chat(model="auto", content=EASY, max_tokens=8)
        assert easy.status_code == 200, easy.text
        assert easy.headers["x-joulegate-tier"] == "small" and easy.json()["model"] == "small-model"
        assert float(easy.headers["x-joulegate-difficulty"]) < 0.45
        hard = await gw.chat(model="auto", content=HARD, max_tokens=8)
        assert hard.headers["x-joulegate-tier"] == "big" and hard.json()["model"] == "big-model"
        assert float(hard.headers["x-joulegate-difficulty"]) >= 0.45
        # Each backend got exactly the request routed to it, with its tier's model.
        assert [r.messages[0]["content"] for r in gw.backends["up-small"].requests] == [EASY]
        assert [r.messages[0]["content"] for r in gw.backends["up-big"].requests] == [HARD]
        assert gw.backends["up-big"].requests[0].model == "big-model"
        assert await gw.metric("joulegate_route_decisions_total", tenant="acme", tier="small",
                               reason="gate") == 1
        assert await gw.metric("joulegate_route_decisions_total", tenant="acme", tier="big",
                               reason="gate") == 1
        assert await gw.metric("joulegate_difficulty_score_count", tenant="acme") == 2


async def test_a_threshold_above_every_score_keeps_auto_on_the_default_tier(tmp_path):
    async with InProcessGateway(tmp_path, routed_policy(thresholds={"big": 1.0})) as gw:
        hard = await gw.chat(model="auto", content=HARD, max_tokens=8)
        assert hard.headers["x-joulegate-tier"] == "small"
        assert gw.backends["up-big"].requests == []


async def test_pins_by_tier_and_model_name_and_the_max_tier_header(tmp_path):
    async with InProcessGateway(tmp_path, routed_policy()) as gw:
        r = await gw.chat(model="big", content=EASY)
        assert r.headers["x-joulegate-tier"] == "big" and "x-joulegate-difficulty" not in r.headers
        r = await gw.chat(model="big-model", content=HARD)  # the concrete model name pins too
        assert r.headers["x-joulegate-tier"] == "big"
        r = await gw.chat(model="auto", content=HARD, headers={"X-Joulegate-Max-Tier": "small"})
        assert r.headers["x-joulegate-tier"] == "small"
        assert await gw.metric("joulegate_route_decisions_total", tier="big", reason="pinned") == 2
        assert await gw.metric("joulegate_route_decisions_total", tier="small",
                               reason="capped") == 1

        r = await gw.chat(model="auto", content=HARD, headers={"X-Joulegate-Max-Tier": "huge"})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "X-Joulegate-Max-Tier"
        assert r.json()["error"]["code"] == "model_not_found"
        r = await gw.chat(model="big", content=EASY, headers={"X-Joulegate-Max-Tier": "small"})
        assert r.status_code == 400
        assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("above_max_tier", "model")
        # Refused requests reach no backend and cost nothing: 3 answered, 10 + 4 tokens each.
        assert len(gw.backends["up-big"].requests) == 2
        assert len(gw.backends["up-small"].requests) == 1
        assert await gw.metric("joulegate_energy_joules_total", tenant="acme") == \
            2 * joules(10, 4, "big") + joules(10, 4, "small")


async def test_models_lists_what_the_tenant_may_ask_for(tmp_path):
    async with InProcessGateway(tmp_path, routed_policy()) as gw:
        r = await gw.http.get("/v1/models", headers={"authorization": "Bearer sk-test-acme"})
        ids = {m["id"]: m for m in r.json()["data"]}
        assert ids["big-model"]["tier"] == "big" and ids["big-model"]["backend"] == "up-big"
        assert ids["small-model"]["tier"] == "small"
        assert (await gw.http.get("/v1/models")).status_code == 401


@pytest.mark.parametrize("failure", [Script.unavailable(), Script.timeout()],
                         ids=["unavailable", "timeout"])
async def test_a_tier_that_fails_before_its_first_token_falls_back(tmp_path, failure):
    scripts = {"up-big": failure, "up-small": Script(tokens=["fine"], prompt_tokens=5)}
    async with InProcessGateway(tmp_path, routed_policy(), scripts) as gw:
        r = await gw.chat(model="auto", content=HARD, max_tokens=8)
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-tier"] == "small"
        assert r.headers["x-joulegate-fallback"] == "big->small"
        assert r.json()["model"] == "small-model"
        assert r.json()["choices"][0]["message"]["content"] == "fine"
        # The small tier was asked for its own model, the same prompt.
        (retry,) = gw.backends["up-small"].requests
        assert retry.model == "small-model" and retry.messages[0]["content"] == HARD
        assert r.json()["usage"]["energy_joules"] == joules(5, 1, "small")

        stream = await gw.chat(model="auto", content=HARD, max_tokens=8, stream=True,
                               stream_options={"include_usage": True})
        assert stream.status_code == 200
        assert stream.headers["x-joulegate-fallback"] == "big->small"
        events = sse_events(stream.text)
        assert events[-1] == "[DONE]" and events[-2]["model"] == "small-model"
        assert events[-2]["usage"]["completion_tokens"] == 1
        assert await gw.metric("joulegate_fallbacks_total", tenant="acme",
                               **{"from": "big", "to": "small"}) == 2


async def test_a_model_that_cannot_fill_in_the_middle_hands_the_suffix_on(tmp_path):
    """The tier's kind fills in the middle but its model refuses the suffix (vLLM serving a
    model without a FIM renderer, a llama.cpp model without FIM tokens): the request goes on
    down the plan to a tier that can, as when a tier cannot answer; with nowhere to go (a
    pinned tier) the client gets the 400 naming ``suffix``, and the refusal costs nothing."""
    refuse = Script(fail=FeatureUnsupported("scripted: no fill-in-the-middle", param="suffix"))
    scripts = {"up-big": refuse, "up-small": Script(tokens=["fine"], prompt_tokens=5)}
    body = {"model": "auto", "prompt": HARD, "suffix": "\nprint(f([3, 1, 2]))\n", "max_tokens": 8}
    async with InProcessGateway(tmp_path, routed_policy(), scripts) as gw:
        r = await gw.post("/v1/completions", body)
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-fallback"] == "big->small"
        assert r.json()["choices"][0]["text"] == "fine"
        (served,) = gw.backends["up-small"].requests
        assert served.suffix == body["suffix"] and served.prompt == HARD
        assert r.json()["usage"]["energy_joules"] == joules(5, 1, "small")
        stream = await gw.post("/v1/completions", {**body, "stream": True})
        assert stream.status_code == 200 and stream.headers["x-joulegate-fallback"] == "big->small"
        assert sse_events(stream.text)[-1] == "[DONE]"

        r = await gw.post("/v1/completions", {**body, "model": "big"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["code"]) == ("suffix", "rejected_by_backend")
        assert "fill-in-the-middle" in err["message"]
        assert len(gw.backends["up-small"].requests) == 2  # the pinned one went nowhere else
        assert await gw.metric("joulegate_energy_joules_total", tenant="acme") == \
            2 * joules(5, 1, "small")


async def test_a_pinned_tier_does_not_fall_back_unless_the_policy_says_all(tmp_path):
    scripts = {"up-big": Script.unavailable(retry_after_s=7)}
    async with InProcessGateway(tmp_path, routed_policy(), scripts) as gw:
        r = await gw.chat(model="big", content=HARD)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] and "x-joulegate-fallback" not in r.headers
        assert gw.backends["up-small"].requests == []
        streamed = await gw.chat(model="big", content=HARD, stream=True)
        assert streamed.status_code == 503  # no first token: a real status, not an SSE error
        assert streamed.json()["error"]["code"]

        p = routed_policy(fallback="all")
        assert (await gw.reload(p)).status_code == 200
        r = await gw.chat(model="big", content=HARD)
        assert r.status_code == 200 and r.headers["x-joulegate-tier"] == "small"


async def test_a_timeout_with_nowhere_to_fall_is_504_and_a_rejection_is_400(tmp_path):
    scripts = {"up-small": [Script.timeout(), Script.rejected(param="messages")]}
    async with InProcessGateway(tmp_path, routed_policy(fallback="off"), scripts) as gw:
        r = await gw.chat(model="small", content=EASY)
        assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
        r = await gw.chat(model="small", content=EASY)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "rejected_by_backend"
        assert r.json()["error"]["param"] == "messages"
        assert await gw.metric("joulegate_requests_total", tenant="acme", status="504") == 1
        assert await gw.metric("joulegate_requests_total", tenant="acme", status="400") == 1


async def test_a_reload_keeps_unchanged_backends_and_builds_changed_ones(tmp_path):
    async with InProcessGateway(tmp_path, routed_policy()) as gw:
        big, small = gw.backends["up-big"], gw.backends["up-small"]
        p = routed_policy()
        p["backends"]["up-small"]["base_url"] = "http://elsewhere.invalid/v1"
        r = await gw.reload(p)
        assert r.status_code == 200 and r.json()["policy_version"] == 2
        assert gw.backends["up-big"] is big and gw.backends["up-small"] is not small
        assert big.calls.starts == 1 and gw.backends["up-small"].calls.starts == 1
        await gw.chat(model="small", content=EASY)
        assert small.requests == [] and len(gw.backends["up-small"].requests) == 1
        # The replaced backend was closed once no request used it; the kept one was not.
        for _ in range(100):
            if small.calls.closes:
                break
            await asyncio.sleep(0.01)
        assert small.calls.closes == 1 and big.calls.closes == 0
        again = await gw.http.post("/admin/reload", headers=ADMIN)  # same file: nothing rebuilt
        assert again.status_code == 200 and len(gw.built) == 3

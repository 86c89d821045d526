"""Streams that do not end well, in-process: a backend that breaks mid-stream, a client
that leaves mid-stream; and the metrics every request moves, by exact amounts."""

from __future__ import annotations

import pytest

from .inprocess import (
    InProcessGateway,
    auth,
    chat_body,
    joules,
    policy,
    sse_events,
    stream_then_disconnect,
)
from .scripted import Script

pytestmark = [pytest.mark.unit, pytest.mark.anyio]


def budgeted() -> dict:
    return policy({"budgets": [{"window": "1d", "joules": 10_000}]})


async def test_a_mid_stream_failure_ends_with_an_error_event_and_charges_the_tokens_made(tmp_path):
    scripts = {"up-big": Script.broken_after(2, tokens=["a", "b", "c", "d", "e"], prompt_tokens=7)}
    async with InProcessGateway(tmp_path, budgeted(), scripts) as gw:
        r = await gw.chat(model="big", stream=True, stream_options={"include_usage": True})
        assert r.status_code == 200  # the headers went out with the first token
        events = sse_events(r.text)
        role, a, b, error, done = events
        assert role["choices"][0]["delta"]["role"] == "assistant"
        assert [a["choices"][0]["delta"], b["choices"][0]["delta"]] == [{"content": "a"},
                                                                        {"content": "b"}]
        assert set(error) == {"error"}
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert error["error"]["code"] == "upstream_error"
        assert "dropped the connection" in error["error"]["message"]
        assert done == "[DONE]"  # every stream ends with [DONE], a failed one after its error
        # Charged: the prompt and the two tokens produced, no more, no less.
        spent = joules(7, 2, "big")
        assert (await gw.budget())["1d"]["spent_joules"] == pytest.approx(spent)
        assert (await gw.budget())["1d"]["reserved_joules"] == 0
        assert await gw.metric("joulegate_energy_joules_total", tenant="acme") == spent
        assert await gw.metric("joulegate_requests_total", tenant="acme", tier="big",
                               status="502") == 1
        assert await gw.metric("joulegate_tokens_total", tenant="acme", kind="completion") == 2


async def test_a_whole_answer_that_fails_part_way_is_502_and_charges_the_tokens_made(tmp_path):
    scripts = {"up-big": Script.broken_after(3, tokens=["a", "b", "c", "d"], prompt_tokens=6)}
    async with InProcessGateway(tmp_path, budgeted(), scripts) as gw:
        r = await gw.chat(model="big")
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error"
        # The whole answer failed after 3 tokens: those were produced, and are charged.
        assert (await gw.budget())["1d"]["spent_joules"] == pytest.approx(joules(6, 3, "big"))


async def test_a_client_that_leaves_mid_stream_stops_the_backend_and_pays_for_what_was_made(
        tmp_path):
    long = Script(tokens=[f"t{i} " for i in range(200)], prompt_tokens=8, token_delay_s=0.01)
    async with InProcessGateway(tmp_path, budgeted(), {"up-big": long}) as gw:
        status, received = await stream_then_disconnect(
            gw.app, "/v1/chat/completions", chat_body(model="big", stream=True), auth(),
            events_before_disconnect=3)
        assert status == 200 and len(received) >= 3
        backend = gw.backends["up-big"]
        (stream,) = backend.calls.streams
        assert stream.closed_early and not stream.finished
        assert backend.active == 0  # generation stopped, its slot is free
        made = stream.request.progress.completion_tokens
        assert 2 <= made < 50  # stopped long before the 200 tokens (2 s) it would have made
        spent = joules(8, made, "big")
        window = (await gw.budget())["1d"]
        assert window["spent_joules"] == pytest.approx(spent) and window["reserved_joules"] == 0
        assert await gw.metric("joulegate_requests_total", tenant="acme", status="499") == 1
        assert await gw.metric("joulegate_energy_joules_total", tenant="acme") == \
            pytest.approx(spent)


async def test_metrics_move_by_exact_amounts(tmp_path):
    scripts = {"up-big": Script(tokens=["x"] * 6, prompt_tokens=11),
               "up-small": Script(tokens=["y"] * 3, prompt_tokens=5)}
    async with InProcessGateway(tmp_path, policy(), scripts) as gw:
        assert await gw.metric("joulegate_requests_total") == 0
        await gw.chat(model="big")
        await gw.chat(model="big", stream=True)
        await gw.chat(model="small")
        await gw.chat(who="globex", model="small")
        await gw.chat(model="nope")  # 400: counted, costs nothing
        m = gw.metric
        assert await m("joulegate_requests_total", tenant="acme", tier="big", status="200") == 2
        assert await m("joulegate_requests_total", tenant="acme", tier="small", status="200") == 1
        assert await m("joulegate_requests_total", tenant="globex", status="200") == 1
        assert await m("joulegate_requests_total", tenant="acme", status="400") == 1
        assert await m("joulegate_requests_total") == 5
        assert await m("joulegate_energy_joules_total", tenant="acme", tier="big") == \
            2 * joules(11, 6, "big")
        assert await m("joulegate_energy_joules_total", tenant="acme", tier="small") == \
            joules(5, 3, "small")
        assert await m("joulegate_energy_joules_total", tenant="globex") == joules(5, 3, "small")
        assert await m("joulegate_backend_energy_joules_total", backend="up-small") == \
            2 * joules(5, 3, "small")
        assert await m("joulegate_tokens_total", tenant="acme", tier="big", kind="prompt") == 22
        assert await m("joulegate_tokens_total", tenant="acme", tier="big", kind="completion") == 12
        assert await m("joulegate_request_duration_seconds_count", tier="big") == 2
        assert await m("joulegate_request_duration_seconds_count", tier="small") == 2
        # Time to first token: streams only.
        assert await m("joulegate_time_to_first_token_seconds_count", tier="big") == 1
        assert await m("joulegate_time_to_first_token_seconds_count", tier="small") == 0

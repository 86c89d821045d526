"""The OpenAI surface in-process: chat and text completions, whole and streamed, auth and
invalid bodies, through httpx and the official SDK; scripted backends behind the app."""

from __future__ import annotations

import httpx
import langchain_openai
import pytest

from .conftest import KEYS
from .inprocess import ADMIN, BASE_URL, InProcessGateway, chat_body, joules, sse_events
from .scripted import Script

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

TOKENS = ["Hel", "lo", ",", " wor", "ld"]


@pytest.fixture
def scripts():
    return {"up-big": Script(tokens=TOKENS, prompt_tokens=7),
            "up-small": Script(tokens=["ok"], prompt_tokens=3)}


async def test_chat_completion_whole(tmp_path, scripts):
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        r = await gw.chat(model="big", max_tokens=20, temperature=0.5, seed=3, user="u1",
                          headers={"x-request-id": "req-1"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["model"] == "big-model"
        assert body["id"] == "chatcmpl-req-1" and r.headers["x-request-id"] == "req-1"
        (choice,) = body["choices"]
        assert choice["message"] == {"role": "assistant", "content": "Hello, world"}
        assert choice["finish_reason"] == "stop"
        assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                                 "energy_joules": joules(7, 5, "big"),
                                 "energy_source": "estimated",
                                 # issue 19: the default site (PUE 1, no water, no carbon)
                                 "facility_joules": joules(7, 5, "big"), "water_ml": 0.0,
                                 "co2_g": 0.0, "site": "default", "co2_source": "none"}
        assert r.headers["x-joulegate-tier"] == "big"
        assert float(r.headers["x-joulegate-energy-joules"]) == joules(7, 5, "big")
        # What the backend was asked: the tier's model and the client's parameters.
        (seen,) = gw.backends["up-big"].requests
        assert seen.model == "big-model" and seen.is_chat
        assert seen.messages == chat_body()["messages"]
        assert (seen.max_tokens, seen.temperature, seen.seed, seen.user) == (20, 0.5, 3, "u1")
        assert seen.request_id == "req-1"
        assert gw.backends["up-small"].requests == []


async def test_max_tokens_reaches_the_backend_and_the_finish_reason_comes_back(tmp_path, scripts):
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        r = await gw.chat(model="big", max_tokens=2)
        body = r.json()
        assert body["choices"][0]["message"]["content"] == "Hello"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 2
        assert body["usage"]["energy_joules"] == joules(7, 2, "big")


async def test_text_completion_whole_and_streamed(tmp_path, scripts):
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        r = await gw.post("/v1/completions", {"model": "small", "prompt": "Once upon",
                                              "max_tokens": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == "small-model"
        assert body["id"].startswith("cmpl-")
        assert body["choices"][0]["text"] == "ok"
        assert body["usage"]["energy_joules"] == joules(3, 1, "small")
        (seen,) = gw.backends["up-small"].requests
        assert seen.prompt == "Once upon" and seen.messages is None

        r = await gw.post("/v1/completions", {"model": "big", "prompt": "Once upon",
                                              "stream": True,
                                              "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        texts = [e["choices"][0]["text"] for e in events[:-2]]
        assert texts == [*TOKENS, ""] and events[-3]["choices"][0]["finish_reason"] == "stop"
        assert all(e["object"] == "text_completion" for e in events[:-1])
        assert events[-2]["usage"]["energy_joules"] == joules(7, 5, "big")


async def test_a_prompt_list_of_one_is_that_prompt(tmp_path, scripts):
    # LangChain's OpenAI (completion) LLM sends every prompt as a list, one per request for
    # invoke and stream; OpenAI takes a list as a batch. One is served, more are refused.
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        llm = langchain_openai.OpenAI(
            model="small", base_url=f"{BASE_URL}/v1", api_key=KEYS["acme"], max_retries=0,
            max_tokens=5, http_async_client=httpx.AsyncClient(
                transport=httpx.ASGITransport(app=gw.app), base_url=BASE_URL))
        assert await llm.ainvoke("Once upon") == "ok"
        assert "".join([c async for c in llm.astream("Once upon")]) == "ok"
        assert [r.prompt for r in gw.backends["up-small"].requests] == ["Once upon"] * 2
        for prompt, code, words in (
                (["a", "b"], "unsupported_value", "one prompt per request: this one has 2"),
                ([[1, 2]], "unsupported_value", "token-id prompts are not supported"),
                ([], "invalid_value", "empty")):
            r = await gw.post("/v1/completions", {"model": "small", "prompt": prompt})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert (error["param"], error["code"]) == ("prompt", code)
            assert words in error["message"]
        assert len(gw.backends["up-small"].requests) == 2


async def test_chat_stream_events_in_order(tmp_path, scripts):
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        r = await gw.chat(model="big", stream=True, stream_options={"include_usage": True},
                          headers={"x-request-id": "s-1"})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-joulegate-tier"] == "big" and r.headers["x-request-id"] == "s-1"
        events = sse_events(r.text)
        role, *deltas, finish, usage, done = events
        assert done == "[DONE]"
        assert {e["id"] for e in events[:-1]} == {"chatcmpl-s-1"}
        assert {e["object"] for e in events[:-1]} == {"chat.completion.chunk"}
        assert {e["model"] for e in events[:-1]} == {"big-model"}
        assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert [d["choices"][0]["delta"] for d in deltas] == [{"content": t} for t in TOKENS]
        assert all(d["choices"][0]["finish_reason"] is None for d in deltas)
        assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "stop"}
        assert usage["choices"] == []
        assert usage["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                                  "energy_joules": joules(7, 5, "big"),
                                  "energy_source": "estimated",
                                  # issue 19: the default site (PUE 1, no water, no carbon)
                                  "facility_joules": joules(7, 5, "big"), "water_ml": 0.0,
                                  "co2_g": 0.0, "site": "default", "co2_source": "none"}
        (stream,) = gw.backends["up-big"].calls.streams
        assert stream.finished and not stream.closed_early


async def test_stream_without_include_usage_has_no_usage_event(tmp_path, scripts):
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        events = sse_events((await gw.chat(model="big", stream=True)).text)
        assert events[-1] == "[DONE]"
        assert not any("usage" in e and e.get("usage") for e in events[:-1])
        assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_the_official_sdk_whole_and_streamed(tmp_path, scripts):
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        client = gw.openai()
        reply = await client.chat.completions.create(
            model="big", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
        assert reply.choices[0].message.content == "Hello, world"
        assert reply.usage.completion_tokens == 5
        assert reply.usage.model_extra["energy_joules"] == joules(7, 5, "big")
        stream = await client.chat.completions.create(
            model="small", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ok"
        assert chunks[-1].usage.model_extra["energy_joules"] == joules(3, 1, "small")
        models = await client.models.list()
        assert {"big-model", "small-model"} <= {m.id for m in models.data}


async def test_auth_errors_are_401_and_reach_no_backend(tmp_path, scripts):
    import openai

    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        missing = await gw.post("/v1/chat/completions", chat_body(), who=None)
        wrong = await gw.post("/v1/chat/completions", chat_body(), who=None,
                              headers={"authorization": "Bearer sk-nobody"})
        malformed = await gw.post("/v1/chat/completions", chat_body(), who=None,
                                  headers={"authorization": "Basic abc"})
        admin_as_tenant = await gw.post("/v1/chat/completions", chat_body(), who=None,
                                        headers=ADMIN)
        for r in (missing, wrong, malformed, admin_as_tenant):
            assert r.status_code == 401, r.text
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and err["type"]
            assert "sk-nobody" not in err["message"]
        assert "missing" in missing.json()["error"]["message"]
        assert gw.backends["up-big"].requests == []
        tenant_as_admin = await gw.http.post("/admin/reload",
                                             headers={"authorization": "Bearer sk-test-acme"})
        assert tenant_as_admin.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            await gw.openai().with_options(api_key="sk-wrong").chat.completions.create(
                model="big", messages=[{"role": "user", "content": "hi"}])
        assert await gw.metric("joulegate_requests_total", tenant="other", status="401") == 5


@pytest.mark.parametrize("body, code, param", [
    (b"{not json", "invalid_json", None),
    (b"[1, 2]", "invalid_json", None),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "missing_required_parameter", "model"),
    (b'{"model": "big"}', "missing_required_parameter", "messages"),
    (b'{"model": "big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "x"}',
     "invalid_type", "max_tokens"),
    (b'{"model": "big", "messages": [{"role": "user", "content": "hi"}], "n": 3}',
     "unsupported_value", "n"),
    (b'{"model": "big", "messages": [{"role": "user", "content": "hi"}], "tools": []}',
     "invalid_value", "tools"),
    (b'{"model": "big", "messages": [{"role": "user", "content": "hi"}], "web_search_options": {}}',
     "unsupported_value", "web_search_options"),
    (b'{"model": "big", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}',
     "unsupported_parameter", "frobnicate"),
    (b'{"model": "huge", "messages": [{"role": "user", "content": "hi"}]}',
     "model_not_found", "model"),
])
async def test_invalid_bodies_are_400_with_the_param_named(tmp_path, scripts, body, code, param):
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        r = await gw.post("/v1/chat/completions", body)
        assert r.status_code in (400, 404), r.text
        err = r.json()["error"]
        assert err["code"] == code and err["param"] == param
        assert err["type"] == "invalid_request_error"
        assert gw.backends["up-big"].requests == []
        # A refused request costs nothing and is counted once, under its status.
        assert await gw.metric("joulegate_energy_joules_total") == 0
        assert await gw.metric("joulegate_requests_total", tenant="acme", status="400") == 1


async def test_a_body_over_the_limit_is_413(tmp_path, scripts):
    from .inprocess import policy

    async with InProcessGateway(tmp_path, policy(server={"max_body_bytes": 1024}),
                                scripts=scripts) as gw:
        r = await gw.chat(content="x" * 1100)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert (await gw.chat(content="short")).status_code == 200


async def test_unknown_routes_and_methods(tmp_path, scripts):
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        r = await gw.http.get("/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await gw.http.get("/v1/chat/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        assert (await gw.http.get("/healthz")).json() == {"status": "ok"}
        ready = await gw.http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["backends"]["up-big"]["ok"] is True
        gw.backends["up-small"].healthy = False
        ready = await gw.http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["backends"]["up-small"]["ok"] is False

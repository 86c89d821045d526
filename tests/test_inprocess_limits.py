"""Limits a server on the internet needs (issue 15), in-process: header count and size
(431), a slow body (408), HTTP/1.0 streams (one body with a length), a stream the server
stops (``server_shutting_down`` then ``[DONE]``, its joules settled), the metrics token,
explicit budget resets and the OpenAPI flag."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from policies import key_digest

from .inprocess import ADMIN, InProcessGateway, auth, chat_body, joules, policy, sse_events
from .scripted import Script

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

METRICS_KEY = "sk-test-metrics"


def _openai_error(body: dict[str, Any], code: str) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code


async def test_too_many_or_too_large_headers_are_431(tmp_path):
    p = policy(server={"limits": {"max_header_count": 20, "max_header_bytes": 2048}})
    async with InProcessGateway(tmp_path, p) as gw:
        many = {f"x-extra-{i}": "1" for i in range(25)}
        r = await gw.chat(headers=many)
        assert r.status_code == 431
        _openai_error(r.json(), "request_header_fields_too_large")
        assert "limit of 20" in r.json()["error"]["message"]
        r = await gw.chat(headers={"x-big": "a" * 3000})
        assert r.status_code == 431 and "2048 bytes" in r.json()["error"]["message"]
        # Within both limits: served.
        r = await gw.chat(headers={f"x-extra-{i}": "1" for i in range(5)})
        assert r.status_code == 200, r.text


async def _asgi(app: Any, scope_extra: dict[str, Any], body_parts: list[bytes],
                part_delay_s: float = 0.0, headers: dict[str, str] | None = None,
                path: str = "/v1/chat/completions") -> tuple[list[dict[str, Any]], bytes]:
    """Drive ``app`` with raw ASGI: the body in ``body_parts``, each after ``part_delay_s``."""
    total = sum(len(p) for p in body_parts)
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "server": ("gateway.test", 80), "client": ("127.0.0.1", 40000),
        "headers": [(b"host", b"gateway.test"), (b"content-type", b"application/json"),
                    (b"content-length", str(total).encode()),
                    *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())],
        **scope_extra,
    }
    parts = list(body_parts)
    never = asyncio.Event()
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if parts:
            await asyncio.sleep(part_delay_s)
            part = parts.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(parts)}
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await asyncio.wait_for(app(scope, receive, send), 20)
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return messages, body


async def test_a_body_that_does_not_arrive_in_time_is_408(tmp_path):
    p = policy(server={"limits": {"body_read_timeout_s": 0.2}})
    raw = json.dumps(chat_body()).encode()
    async with InProcessGateway(tmp_path, p) as gw:
        messages, body = await _asgi(gw.app, {}, [raw[:10], raw[10:]], part_delay_s=1.0,
                                     headers=auth())
        assert messages[0]["status"] == 408
        _openai_error(json.loads(body), "request_timeout")
        assert gw.backends["up-big"].requests == []
        # The same body sent at once is served.
        messages, _ = await _asgi(gw.app, {}, [raw], headers=auth())
        assert messages[0]["status"] == 200


async def test_an_http_1_0_client_gets_the_stream_as_one_body_with_a_length(tmp_path):
    raw = json.dumps(chat_body(stream=True)).encode()
    async with InProcessGateway(tmp_path, scripts={"up-big": Script(tokens=["a", "b", "c"])}) as gw:
        messages, body = await _asgi(gw.app, {"http_version": "1.0"}, [raw], headers=auth())
        start = messages[0]
        headers = dict(start["headers"])
        assert start["status"] == 200 and headers[b"content-type"].startswith(b"text/event-stream")
        assert int(headers[b"content-length"]) == len(body)
        bodies = [m for m in messages if m["type"] == "http.response.body"]
        assert len(bodies) == 1 and not bodies[0].get("more_body", False)
        events = sse_events(body.decode())
        assert events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "abc"
        # HTTP/1.1 still streams: several body messages, no length.
        messages, _ = await _asgi(gw.app, {}, [raw], headers=auth())
        assert b"content-length" not in dict(messages[0]["headers"])
        assert len([m for m in messages if m["type"] == "http.response.body"]) > 1


async def test_a_stream_the_server_stops_ends_with_server_shutting_down_and_done(tmp_path):
    """What uvicorn does when the shutdown drain runs out: it cancels the request's task."""
    long = Script(tokens=[f"t{i} " for i in range(500)], prompt_tokens=8, token_delay_s=0.01)
    p = policy({"budgets": [{"window": "1d", "joules": 1e9}]})
    raw = json.dumps(chat_body(stream=True)).encode()
    async with InProcessGateway(tmp_path, p, {"up-big": long}) as gw:
        task = asyncio.get_running_loop().create_task(_asgi(gw.app, {}, [raw], headers=auth()))
        def made() -> int:
            streams = gw.backends["up-big"].calls.streams
            return streams[0].request.progress.completion_tokens if streams else 0

        while made() < 5:  # noqa: ASYNC110 - polls the scripted backend
            await asyncio.sleep(0.01)
        assert gw.app.state.open_streams  # the stream is registered while it runs
        # Cancel the ASGI call itself, as uvicorn cancels its request tasks.
        (stream_task,) = gw.app.state.open_streams
        stream_task.cancel()
        messages, body = await task
        events = sse_events(body.decode())
        assert events[-1] == "[DONE]"
        _openai_error(events[-2], "server_shutting_down")
        assert messages[-1]["more_body"] is False
        assert not gw.app.state.open_streams
        (stream,) = gw.backends["up-big"].calls.streams
        assert stream.closed_early and gw.backends["up-big"].active == 0
        made = stream.request.progress.completion_tokens
        assert 5 <= made < 500
        window = (await gw.budget())["1d"]
        assert window["spent_joules"] == pytest.approx(joules(8, made, "big"))
        assert window["reserved_joules"] == 0


async def test_the_metrics_token_guards_metrics_and_readiness_details(tmp_path, monkeypatch):
    monkeypatch.setenv("JG_TEST_METRICS_KEY", METRICS_KEY)
    for ref in ("env:JG_TEST_METRICS_KEY", "sha256:" + key_digest(METRICS_KEY)):
        async with InProcessGateway(tmp_path, policy(server={"metrics_token": ref})) as gw:
            r = await gw.http.get("/metrics")
            assert r.status_code == 401
            _openai_error(r.json(), "invalid_api_key")
            r = await gw.http.get("/metrics", headers=auth())  # a tenant key is not it
            assert r.status_code == 401
            token = {"authorization": f"Bearer {METRICS_KEY}"}
            r = await gw.http.get("/metrics", headers=token)
            assert r.status_code == 200 and "joulegate_" in r.text
            r = await gw.http.get("/readyz")
            assert r.status_code == 200 and r.json() == {"status": "ready"}
            r = await gw.http.get("/readyz", headers=token)
            assert r.status_code == 200 and set(r.json()["backends"]) == {"up-big", "up-small"}
    async with InProcessGateway(tmp_path, policy()) as gw:  # off by default
        assert (await gw.http.get("/metrics")).status_code == 200
        assert "backends" in (await gw.http.get("/readyz")).json()


async def test_a_budget_reset_names_its_window_or_says_all(tmp_path):
    p = policy({"budgets": [{"window": "1h", "joules": 1e6}, {"window": "1d", "joules": 1e6}]})
    async with InProcessGateway(tmp_path, p) as gw:
        assert (await gw.chat()).status_code == 200
        spent = (await gw.budget())["1d"]["spent_joules"]
        assert spent > 0
        url = "/admin/tenants/acme/budget/reset"
        for body in ({}, {"window": ""}, {"window": "2h"}, {"window": None}, {"all": False},
                     {"all": True, "window": "1h"}):
            r = await gw.http.post(url, json=body, headers=ADMIN)
            assert r.status_code == 400, body
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert r.json()["error"]["param"] == "window"
            assert "1h" in r.json()["error"]["message"] and "1d" in r.json()["error"]["message"]
        assert (await gw.budget())["1d"]["spent_joules"] == spent  # nothing was reset
        r = await gw.http.post(url, json={"window": "1h"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["reset"] == ["1h"]
        windows = await gw.budget()
        assert windows["1h"]["spent_joules"] == 0 and windows["1d"]["spent_joules"] == spent
        r = await gw.http.post(url, json={"all": True}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["reset"] == ["1h", "1d"]
        assert (await gw.budget())["1d"]["spent_joules"] == 0


async def test_the_openapi_document_is_served_only_when_the_policy_says_so(tmp_path):
    async with InProcessGateway(tmp_path, policy()) as gw:
        r = await gw.http.get("/openapi.json")
        assert r.status_code == 404
        _openai_error(r.json(), "not_found")
    async with InProcessGateway(tmp_path, policy(server={"openapi": True})) as gw:
        r = await gw.http.get("/openapi.json")
        assert r.status_code == 200
        doc = r.json()
        chat = doc["paths"]["/v1/chat/completions"]["post"]
        ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert "messages" in schema["required"] and "model" in schema["properties"]
        assert {"400", "401", "408", "413", "429", "431", "503"} <= set(chat["responses"])

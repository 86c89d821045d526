"""Tools, structured outputs and logprobs on ``POST /v1/chat/completions`` end to end (issue
16): a real ``joulegate serve`` on the real Qwen 0.5B (llama.cpp in-process), driven by the
official SDK — a required tool call and its round trip, streamed tool calls,
``chat.completions.parse`` with a nested Pydantic model, logprobs — and a second gateway
whose ``openai`` backend is the first one over HTTP, for structured output and forwarded
fields through an HTTP upstream.

The small model's wording is not asserted, only the protocol: calls name an offered function
with JSON arguments that validate, parsed answers validate against the schema."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from policies import key_digest

from .conftest import KEYS, Gateway, llamacpp_policy

pytestmark = pytest.mark.e2e

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What's the weather like in Paris today?"}]


class Address(BaseModel):
    city: str
    country: str


class Person(BaseModel):
    name: str
    age: int = Field(ge=0)
    address: Address


@pytest.fixture(scope="module")
def gw(tmp_path_factory, small_model_path) -> Iterator[Gateway]:
    gateway = Gateway(llamacpp_policy(max_body_bytes=1 << 16),
                      tmp_path_factory.mktemp("fields")).start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def front(tmp_path_factory, gw) -> Iterator[Gateway]:
    """A second gateway whose only tier is the first gateway, as an ``openai`` upstream."""
    policy = {
        "version": 1,
        "backends": {"up": {"kind": "openai", "base_url": f"{gw.url}/v1",
                            "api_key": "env:JG_UPSTREAM_KEY"}},
        "tiers": [{"name": "remote", "backend": "up", "model": "small", "cost": 1}],
        "tenants": {"acme": {"keys": ["sha256:" + key_digest(KEYS["acme"])],
                             "default_tier": "remote"}},
    }
    gateway = Gateway(policy, tmp_path_factory.mktemp("fields-front"),
                      env={"JG_UPSTREAM_KEY": KEYS["acme"]}).start()
    yield gateway
    gateway.stop()


def test_required_tool_call_and_its_round_trip(gw):
    client = gw.client()
    reply = client.chat.completions.create(model="small", messages=ASK, tools=[WEATHER],
                                           tool_choice="required", temperature=0, max_tokens=60,
                                           logprobs=True)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.logprobs.content == []  # the call's tokens are no content (llama.cpp has them)
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])

    follow = [*ASK, choice.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id,
               "content": json.dumps({"city": args["city"], "sky": "sunny", "celsius": 21})}]
    final = client.chat.completions.create(model="small", messages=follow, tools=[WEATHER],
                                           tool_choice="none", temperature=0, max_tokens=40)
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_a_legacy_function_call(gw):
    reply = gw.client().chat.completions.create(
        model="small", messages=ASK, functions=[WEATHER["function"]],
        function_call={"name": "get_weather"}, temperature=0, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call" and not choice.message.tool_calls
    assert choice.message.function_call.name == "get_weather"
    jsonschema.validate(json.loads(choice.message.function_call.arguments),
                        WEATHER["function"]["parameters"])


def test_streamed_tool_calls(gw):
    stream = gw.client().chat.completions.create(
        model="small", messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0,
        max_tokens=60, stream=True, logprobs=True)
    ids, names, args, finish = [], [], "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        assert not (choice.logprobs and choice.logprobs.content)  # no text: none
        for piece in choice.delta.tool_calls or ():
            assert piece.index == 0
            ids += [piece.id] if piece.id else []
            names += [piece.function.name] if piece.function.name else []
            args += piece.function.arguments or ""
        finish = choice.finish_reason or finish
    assert finish == "tool_calls" and names == ["get_weather"] and len(ids) == 1
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])


def _parse(gateway: Gateway, model: str) -> Person:
    reply = gateway.client().chat.completions.parse(
        model=model, temperature=0, max_tokens=120, response_format=Person,
        messages=[{"role": "user", "content": "Ada Lovelace, 36, lives in London, UK. "
                                              "Give her as JSON."}])
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), Person.model_json_schema())
    person = choice.message.parsed
    assert isinstance(person, Person) and isinstance(person.address, Address)
    return person


def test_parse_with_a_nested_pydantic_model_on_llamacpp(gw):
    _parse(gw, "small")


def test_parse_through_an_http_upstream(front):
    _parse(front, "remote")


def test_forwarded_and_dropped_fields_through_an_http_upstream(gw, front):
    """The front gateway forwards presence_penalty and metadata as given; the llama.cpp
    gateway behind it uses the penalty, not the metadata, and says so."""
    body = {"model": "remote", "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 4, "presence_penalty": 0.5, "metadata": {"team": "a"}, "store": True}
    r = httpx.post(f"{front.url}/v1/chat/completions", json=body, timeout=120,
                   headers={"authorization": f"Bearer {KEYS['acme']}",
                            "x-request-id": "fwd-1"})
    assert r.status_code == 200, r.text
    assert r.headers["x-joulegate-dropped-params"] == "store"  # forwarded: the rest
    back = httpx.post(f"{gw.url}/v1/chat/completions", json={**body, "model": "small"},
                      timeout=120, headers={"authorization": f"Bearer {KEYS['acme']}"})
    assert back.headers["x-joulegate-dropped-params"] == "metadata,store"
    assert '"dropped_params":["metadata"]' in gw.log()


def test_penalties_change_what_the_llamacpp_tier_says(gw):
    """frequency_penalty and presence_penalty reach llama.cpp's sampler: greedy decoding of
    a prompt that invites repetition says something else under a penalty (and the same
    again without one: nothing is left behind), and the header does not list them as
    dropped."""
    def say(prompt: str, **penalties: float) -> tuple[str, httpx.Response]:
        body = {"model": "small", "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}], **penalties}
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=120,
                       headers={"authorization": f"Bearer {KEYS['acme']}"})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r

    for prompt, penalty in (("Write the word cat 20 times.", {"frequency_penalty": 2.0}),
                            ("Count from 1 to 20.", {"presence_penalty": 2.0})):
        plain, _ = say(prompt)
        penalised, r = say(prompt, **penalty)
        assert penalised != plain, (prompt, penalty, plain)
        assert "x-joulegate-dropped-params" not in r.headers
        assert say(prompt)[0] == plain


def test_logprobs(gw):
    reply = gw.client().chat.completions.create(
        model="small", messages=[{"role": "user", "content": "Say hi."}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert content and len(content) == reply.usage.completion_tokens
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in content)
    assert "".join(e.token for e in content).strip()

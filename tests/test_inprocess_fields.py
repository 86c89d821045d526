"""The field policy in-process (issue 16): every OpenAI request field of the table in
``gateway/fields.py`` forwarded, translated, dropped with ``X-Joulegate-Dropped-Params`` or
refused, as the table says; one 400 for every invalid field; ``unsupported_params: reject``;
routing by capability; tool calls and log-probabilities in whole and streamed answers,
through httpx and the official SDK; a model output that cannot be made valid."""

from __future__ import annotations

import json
import logging

import pytest
from pydantic import BaseModel

import gateway.fields
from backends.base import BackendInvalidOutput, GenerationRequest
from backends.features import NamedToolChoice, ResponseFormat, ToolCall, ToolSpec
from gateway.budgets.guard import estimate_prompt_tokens
from gateway.fields import FIELDS, markdown_table

from .inprocess import InProcessGateway, chat_body, in_process_small, policy, sse_events
from .scripted import Script

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

TOKENS = ["Hel", "lo", ",", " wor", "ld"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CALL = ToolCall("call_abc123", "get_weather", '{"city": "Paris"}')


def with_messages(**fields):
    def apply(body):
        body["messages"] = [{**body["messages"][0], **fields}]
    return apply


def extra(name):
    return lambda seen: seen.extra[name]


# (endpoint, field) → (value or body patch, what the backend sees: a function of its request).
# Every field of the table is here (checked below), so a field added to the table gets a case.
CASES = {
    ("chat", "model"): ("big", lambda s: s.model),
    ("completions", "model"): ("big", lambda s: s.model),
    ("chat", "messages"): ([{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]},
                            {"role": "user", "content": "hi"}], lambda s: s.messages),
    ("chat", "messages[].name"): (with_messages(name="ann"), lambda s: s.messages[0]["name"]),
    ("chat", "messages[].refusal"): (
        lambda b: b.update(messages=[{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": None, "refusal": "no"},
                                     {"role": "user", "content": "please"}]),
        lambda s: s.messages[1]),
    ("chat", "messages[].provider_specific_fields"): (
        lambda b: b.update(messages=[{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "a", "provider_specific_fields": {"refusal": None}},
                                     {"role": "user", "content": "again"}]),
        lambda s: s.messages[1]),
    ("chat", "messages[].reasoning_content"): (
        lambda b: b.update(messages=[{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "a", "reasoning_content": "hm"},
                                     {"role": "user", "content": "again"}]),
        lambda s: s.messages[1]),
    ("chat", "messages[].thinking_blocks"): (
        lambda b: b.update(messages=[{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "a", "thinking_blocks": [{"type": "thinking"}]},
                                     {"role": "user", "content": "again"}]),
        lambda s: s.messages[1]),
    ("completions", "prompt"): ("Once upon", lambda s: s.prompt),
    ("chat", "stream"): (False, None),
    ("completions", "stream"): (False, None),
    ("chat", "stream_options.include_usage"): (
        lambda b: b.update(stream=True, stream_options={"include_usage": True}), None),
    ("completions", "stream_options.include_usage"): (
        lambda b: b.update(stream=True, stream_options={"include_usage": True}), None),
    ("chat", "stream_options.include_obfuscation"): (
        lambda b: b.update(stream=True, stream_options={"include_obfuscation": False}), None),
    ("completions", "stream_options.include_obfuscation"): (
        lambda b: b.update(stream=True, stream_options={"include_obfuscation": False}), None),
    ("chat", "max_tokens"): (7, lambda s: s.max_tokens),
    ("completions", "max_tokens"): (7, lambda s: s.max_tokens),
    ("chat", "max_completion_tokens"): (9, lambda s: s.max_tokens),
    ("chat", "temperature"): (0.5, lambda s: s.temperature),
    ("completions", "temperature"): (0.5, lambda s: s.temperature),
    ("chat", "top_p"): (0.9, lambda s: s.top_p),
    ("completions", "top_p"): (0.9, lambda s: s.top_p),
    ("chat", "seed"): (42, lambda s: s.seed),
    ("completions", "seed"): (42, lambda s: s.seed),
    ("chat", "stop"): (["END"], lambda s: s.stop),
    ("completions", "stop"): (["END"], lambda s: s.stop),
    ("chat", "n"): (2, None),
    ("completions", "n"): (2, None),
    ("chat", "frequency_penalty"): (0.5, extra("frequency_penalty")),
    ("completions", "frequency_penalty"): (0.5, extra("frequency_penalty")),
    ("chat", "presence_penalty"): (-0.5, extra("presence_penalty")),
    ("completions", "presence_penalty"): (-0.5, extra("presence_penalty")),
    ("chat", "logit_bias"): ({"50256": -100}, extra("logit_bias")),
    ("completions", "logit_bias"): ({"50256": -100}, extra("logit_bias")),
    ("chat", "user"): ("u-1", lambda s: s.user),
    ("completions", "user"): ("u-1", lambda s: s.user),
    ("chat", "metadata"): ({"team": "a"}, extra("metadata")),
    ("chat", "safety_identifier"): ("hash-1", extra("safety_identifier")),
    ("chat", "prompt_cache_key"): ("k", extra("prompt_cache_key")),
    ("chat", "prompt_cache_retention"): ("24h", extra("prompt_cache_retention")),
    ("chat", "prompt_cache_options"): ({"mode": "implicit"}, extra("prompt_cache_options")),
    ("chat", "reasoning_effort"): ("low", extra("reasoning_effort")),
    ("chat", "verbosity"): ("low", extra("verbosity")),
    ("chat", "tools"): ([WEATHER], lambda s: s.tools),
    ("chat", "tool_choice"): (
        lambda b: b.update(tools=[WEATHER],
                           tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        lambda s: s.tool_choice),
    ("chat", "parallel_tool_calls"): (lambda b: b.update(tools=[WEATHER], parallel_tool_calls=False),
                                      lambda s: s.parallel_tool_calls),
    ("chat", "response_format"): (
        {"type": "json_schema", "json_schema": {"name": "P", "strict": True, "schema": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
            "additionalProperties": False}}},
        lambda s: s.response_format),
    ("chat", "logprobs"): (True, lambda s: (s.logprobs, s.top_logprobs)),
    ("chat", "top_logprobs"): (lambda b: b.update(logprobs=True, top_logprobs=3),
                               lambda s: (s.logprobs, s.top_logprobs)),
    ("completions", "logprobs"): (2, lambda s: (s.logprobs, s.top_logprobs)),
    ("chat", "store"): (True, None),
    ("chat", "service_tier"): ("flex", None),
    ("chat", "modalities"): (["text"], None),
    ("chat", "audio"): ({"voice": "alloy", "format": "wav"}, None),
    ("chat", "prediction"): ({"type": "content", "content": "x"}, None),
    ("chat", "web_search_options"): ({"search_context_size": "low"}, None),
    ("chat", "functions"): ([WEATHER["function"]],
                            lambda s: (s.tools, s.tool_choice, s.parallel_tool_calls)),
    ("chat", "function_call"): (lambda b: b.update(functions=[WEATHER["function"]],
                                                   function_call={"name": "get_weather"}),
                                lambda s: s.tool_choice),
    ("chat", "moderation"): ({"model": "omni-moderation-latest"}, None),
    ("completions", "best_of"): (3, None),
    ("completions", "echo"): (True, None),
    ("completions", "suffix"): ("\n    return a", lambda s: s.suffix),
    ("chat", "messages[].content image_url / input_audio / file parts"): (
        with_messages(content=[{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]),
        None),
}

#: What the backend sees for a translated or forwarded field.
EXPECTED = {
    "model": "big-model",
    ("chat", "messages"): [{"role": "system", "content": "a\nb"}, {"role": "user", "content": "hi"}],
    "messages[].name": "ann",
    "messages[].refusal": {"role": "assistant", "content": None, "refusal": "no"},
    # dropped: the backend gets the message without them
    "messages[].provider_specific_fields": {"role": "assistant", "content": "a"},
    "messages[].reasoning_content": {"role": "assistant", "content": "a"},
    "messages[].thinking_blocks": {"role": "assistant", "content": "a"},
    "prompt": "Once upon", "max_tokens": 7, "max_completion_tokens": 9, "temperature": 0.5,
    "top_p": 0.9, "seed": 42, "stop": ["END"], "frequency_penalty": 0.5,
    "presence_penalty": -0.5, "logit_bias": {"50256": -100}, "user": "u-1",
    "metadata": {"team": "a"}, "safety_identifier": "hash-1", "prompt_cache_key": "k",
    "prompt_cache_retention": "24h", "prompt_cache_options": {"mode": "implicit"},
    "reasoning_effort": "low", "verbosity": "low",
    "tools": [ToolSpec("get_weather", "Weather in a city", WEATHER["function"]["parameters"])],
    "tool_choice": NamedToolChoice("get_weather"), "parallel_tool_calls": False,
    "response_format": ResponseFormat("json_schema", "P", CASES[("chat", "response_format")][0]
                                      ["json_schema"]["schema"], True),
    ("chat", "logprobs"): (True, None), "top_logprobs": (True, 3),
    ("chat", "functions"): (
        [ToolSpec("get_weather", "Weather in a city", WEATHER["function"]["parameters"])],
        None, False),  # one call per answer, as the legacy API
    ("chat", "function_call"): NamedToolChoice("get_weather"),
    ("completions", "logprobs"): (True, 2),
    ("completions", "suffix"): "\n    return a",
}


def test_every_field_of_the_table_has_a_case():
    table = {(e, r.name) for r in FIELDS for e in r.endpoints}
    assert set(CASES) == table


def test_the_readme_shows_the_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert markdown_table() in readme


def _request(endpoint, name, model):
    body = chat_body(model=model) if endpoint == "chat" else {"model": model, "prompt": "x"}
    value, _ = CASES[(endpoint, name)]
    if callable(value):
        value(body)
    elif name == "model":
        body["model"] = value
    elif "." in name:
        raise AssertionError(name)
    else:
        body[name] = value
    return body


@pytest.mark.parametrize("endpoint, name", sorted(CASES))
@pytest.mark.parametrize("tier", ["big", "small"])
async def test_field_matrix(tmp_path, endpoint, name, tier):
    """``big`` is an HTTP upstream, ``small`` an in-process kind."""
    rule = gateway.fields.rule(name, endpoint)
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    model = "big" if name == "model" else tier
    async with InProcessGateway(tmp_path, in_process_small(policy()),
                                scripts={"up-big": Script(tokens=TOKENS),
                                         "up-small": Script(tokens=TOKENS)}) as gw:
        r = await gw.post(path, _request(endpoint, name, model))
        if rule.handling == "refuse":
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"].startswith(name.split(" ")[0].replace("[]", "[0]"))
            assert err["code"] == "unsupported_value"
            assert gw.backends["up-big"].requests == gw.backends["up-small"].requests == []
            return
        assert r.status_code == 200, r.text
        dropped = r.headers.get("x-joulegate-dropped-params", "").split(",")
        (seen,) = gw.backends["up-" + model].requests
        local = model == "small"
        on_reply = name.startswith("messages[]") and name not in ("messages[].name",)
        shown = name.replace("[]", "[1]" if on_reply else "[0]")
        if rule.handling == "drop":
            assert shown in dropped
            assert name not in seen.extra
        elif rule.handling == "pass" and local and rule.local == "dropped":
            assert shown in dropped  # the in-process backend does not use it
        else:
            assert dropped == [""], dropped
        check = CASES[(endpoint, name)][1]
        if check is not None:
            want = EXPECTED.get((endpoint, name), EXPECTED.get(name))
            assert check(seen) == want


async def test_one_400_lists_every_invalid_field(tmp_path):
    async with InProcessGateway(tmp_path) as gw:
        r = await gw.chat(n=2, temperature=3, audio={"voice": "x"}, frobnicate=1,
                          messages=[{"role": "tool", "content": "x"}])
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["message"].startswith("5 invalid parameters")
        names = ("n", "temperature", "audio", "frobnicate", "messages[0].tool_call_id")
        for name in names:
            assert f"'{name}'" in err["message"]
        first = min(names, key=lambda n: err["message"].index(f"'{n}'"))
        assert err["param"] == first  # param: the first of them
        assert gw.backends["up-big"].requests == []


async def test_the_access_record_lists_rejected_and_dropped_params(tmp_path, caplog):
    async with InProcessGateway(tmp_path) as gw:
        with caplog.at_level(logging.INFO, "joulegate.access"):
            await gw.chat(n=2, frobnicate=1)
            await gw.chat(store=True, service_tier="flex")
        refused, served = [r.access for r in caplog.records if hasattr(r, "access")]
        assert refused["status"] == 400 and refused["rejected_params"] == ["n", "frobnicate"]
        assert served["status"] == 200 and served["dropped_params"] == ["service_tier", "store"]


async def test_unsupported_params_reject(tmp_path):
    p = in_process_small(policy({"unsupported_params": "reject"}))
    async with InProcessGateway(tmp_path, p) as gw:
        r = await gw.chat(store=True, service_tier="flex", n=3)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "n"
        assert "'store'" in err["message"] and "'service_tier'" in err["message"]
        assert "unsupported_params" in err["message"]
        # forwarded to an HTTP upstream: used, so served
        r = await gw.chat(model="big", presence_penalty=0.5)
        assert r.status_code == 200 and "x-joulegate-dropped-params" not in r.headers
        # an in-process tier would not use it: refused, and nothing generated
        r = await gw.chat(model="small", logit_bias={"50256": -100}, user="u")
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "unsupported_parameter" and err["param"] == "logit_bias"
        assert "'user'" in err["message"]
        assert gw.backends["up-small"].requests == []
        assert (await gw.chat(model="small")).status_code == 200
        # a penalty is used there: served under reject too
        assert (await gw.chat(model="small", presence_penalty=0.5)).status_code == 200
    (tmp_path / "drop").mkdir()
    async with InProcessGateway(tmp_path / "drop") as gw:  # the default: drop
        r = await gw.chat(store=True)
        assert r.status_code == 200 and r.headers["x-joulegate-dropped-params"] == "store"


async def test_routed_only_among_tiers_with_the_capability(tmp_path):
    p = in_process_small(policy({"default_tier": "small"}), ["tools", "structured_output"])
    async with InProcessGateway(tmp_path, p) as gw:
        assert (await gw.chat(model="auto")).headers["x-joulegate-tier"] == "small"
        r = await gw.chat(model="auto", tools=[WEATHER])
        assert r.status_code == 200 and r.headers["x-joulegate-tier"] == "big"
        r = await gw.chat(model="auto", response_format={"type": "json_object"})
        assert r.headers["x-joulegate-tier"] == "big"
        # text needs nothing
        r = await gw.chat(model="auto", response_format={"type": "text"})
        assert r.headers["x-joulegate-tier"] == "small"
        served = len(gw.backends["up-small"].requests)
        r = await gw.chat(model="small", tools=[WEATHER], response_format={"type": "json_object"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "capability_missing" and err["param"] == "model"
        assert "'tools'" in err["message"] and "'structured_output'" in err["message"]
        assert "big" in err["message"]
        assert len(gw.backends["up-small"].requests) == served


async def test_a_suffix_goes_only_to_tiers_that_fill_in_the_middle(tmp_path):
    """``suffix`` needs the ``insertion`` capability: a tier whose model cannot fill in the
    middle is left out (``disable: [insertion]``), a request pinned to it is refused before
    anything is generated, and the prompt the budget reserves for counts the suffix."""
    p = in_process_small(policy({"default_tier": "small"}), ["insertion"])
    async with InProcessGateway(tmp_path, p) as gw:
        body = {"model": "auto", "prompt": "def add(a, b):\n    return ", "max_tokens": 8}
        assert (await gw.post("/v1/completions", body)).headers["x-joulegate-tier"] == "small"
        r = await gw.post("/v1/completions", {**body, "suffix": "\n\nprint(add(1, 2))\n"})
        assert r.status_code == 200 and r.headers["x-joulegate-tier"] == "big", r.text
        assert gw.backends["up-big"].requests[-1].suffix == "\n\nprint(add(1, 2))\n"
        served = len(gw.backends["up-small"].requests)
        r = await gw.post("/v1/completions", {**body, "model": "small", "suffix": "x"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "capability_missing" and err["param"] == "model"
        assert "'insertion'" in err["message"] and "suffix" in err["message"]
        assert len(gw.backends["up-small"].requests) == served


def test_a_suffix_counts_in_the_prompt_estimate():
    plain = GenerationRequest(model="m", prompt="def add(a, b):\n    return ")
    filled = GenerationRequest(model="m", prompt=plain.prompt, suffix="x" * 400)
    assert estimate_prompt_tokens(filled) == estimate_prompt_tokens(plain) + 100


async def test_no_tier_with_the_capability_is_a_400(tmp_path):
    p = policy()
    for tier in p["tiers"]:  # the operator turns log-probabilities off everywhere
        tier["disable"] = ["logprobs"]
    async with InProcessGateway(tmp_path, p) as gw:
        r = await gw.chat(model="auto", logprobs=True)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "capability_missing" and "'logprobs'" in err["message"]


async def test_tool_calls_whole_and_a_round_trip_with_the_sdk(tmp_path):
    scripts = {"up-big": [Script(tokens=[], tool_calls=[CALL]), Script(tokens=["Sunny", "."])]}
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        client = gw.openai()
        ask = [{"role": "user", "content": "Weather in Paris?"}]
        reply = await client.chat.completions.create(model="big", messages=ask, tools=[WEATHER],
                                                     tool_choice="required")
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert (call.id, call.type, call.function.name) == (CALL.id, "function", "get_weather")
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        (seen,) = gw.backends["up-big"].requests
        assert seen.tool_choice == "required" and [t.name for t in seen.tools] == ["get_weather"]

        follow = [*ask, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
        reply = await client.chat.completions.create(model="big", messages=follow,
                                                     tools=[WEATHER])
        assert reply.choices[0].message.content == "Sunny."
        seen = gw.backends["up-big"].requests[1]
        assert seen.messages[1] == {"role": "assistant", "content": None, "tool_calls": [
            {"id": CALL.id, "type": "function",
             "function": {"name": "get_weather", "arguments": CALL.arguments}}]}
        assert seen.messages[2] == {"role": "tool", "content": '{"sky": "sunny"}',
                                    "tool_call_id": CALL.id}


async def test_tool_calls_streamed(tmp_path):
    scripts = {"up-big": Script(tokens=["Let me check."], tool_calls=[CALL])}
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        r = await gw.chat(model="big", tools=[WEATHER], stream=True)
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        deltas = [e["choices"][0]["delta"] for e in events[:-1]]
        pieces = [d["tool_calls"] for d in deltas if "tool_calls" in d]
        assert pieces[0] == [{"index": 0, "id": CALL.id, "type": "function",
                              "function": {"name": "get_weather", "arguments": ""}}]
        assert "".join(p[0]["function"]["arguments"] for p in pieces) == CALL.arguments
        assert "".join(d.get("content") or "" for d in deltas) == "Let me check."
        assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"

        client = gw.openai()
        args, names, finish = "", [], None
        async for chunk in await client.chat.completions.create(
                model="big", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
                stream=True):
            choice = chunk.choices[0]
            for d in choice.delta.tool_calls or ():
                names += [d.function.name] if d.function.name else []
                args += d.function.arguments or ""
            finish = choice.finish_reason or finish
        assert names == ["get_weather"] and json.loads(args) == {"city": "Paris"}
        assert finish == "tool_calls"


async def test_logprobs_whole_and_streamed(tmp_path):
    async with InProcessGateway(tmp_path, scripts={"up-big": Script(tokens=TOKENS)}) as gw:
        client = gw.openai()
        reply = await client.chat.completions.create(
            model="big", messages=[{"role": "user", "content": "hi"}], logprobs=True,
            top_logprobs=2)
        content = reply.choices[0].logprobs.content
        assert [e.token for e in content] == TOKENS
        assert all(e.logprob == -0.25 and len(e.top_logprobs) == 2 for e in content)
        assert content[0].bytes == list(b"Hel")

        tokens = []
        async for chunk in await client.chat.completions.create(
                model="big", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                stream=True):
            if chunk.choices and chunk.choices[0].logprobs:
                tokens += [e.token for e in chunk.choices[0].logprobs.content]
        assert tokens == TOKENS

        r = await gw.post("/v1/completions", {"model": "big", "prompt": "x", "logprobs": 1})
        lp = r.json()["choices"][0]["logprobs"]
        assert lp["tokens"] == TOKENS and lp["token_logprobs"] == [-0.25] * 5
        assert lp["top_logprobs"][0] == {"Hel": -0.25}
        assert lp["text_offset"] == [0, 3, 5, 6, 10]
        # not asked: none
        r = await gw.chat(model="big")
        assert r.json()["choices"][0]["logprobs"] is None


async def test_logprobs_cover_the_text_not_a_tool_calls_tokens(tmp_path):
    # The backend reports the call's tokens' log-probabilities too (llama.cpp does); OpenAI's
    # `logprobs.content` is the message text's only, whole and streamed.
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    text = ["Let", " me", " check", "."]
    scripts = {"up-big": [Script(tokens=text, tool_calls=[call, call]),
                          Script(tokens=text, tool_calls=[call, call]),
                          Script(tokens=[], tool_calls=[call])]}
    ask = {"model": "big", "messages": [{"role": "user", "content": "Weather?"}],
           "tools": [WEATHER], "logprobs": True}
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        whole = (await gw.post("/v1/chat/completions", ask)).json()["choices"][0]
        streamed = sse_events((await gw.post("/v1/chat/completions",
                                             {**ask, "stream": True})).text)
        alone = (await gw.post("/v1/chat/completions", ask)).json()["choices"][0]
        assert gw.backends["up-big"].requests[0].logprobs  # they were there to drop
    assert whole["message"]["content"] == "Let me check."
    assert len(whole["message"]["tool_calls"]) == 2
    assert [e["token"] for e in whole["logprobs"]["content"]] == text
    choices = [e["choices"][0] for e in streamed if e != "[DONE]" and e.get("choices")]
    tokens = [t["token"] for c in choices for t in (c["logprobs"] or {}).get("content") or ()]
    assert tokens == text
    for c in choices:  # no call delta carries any, and no event is only log-probabilities
        assert not (c["delta"].get("tool_calls") and c["logprobs"] and c["logprobs"]["content"])
        assert c["delta"] != {"content": ""} or c["finish_reason"] is not None or (
            c["delta"].get("role"))
    assert alone["message"]["content"] is None and alone["logprobs"]["content"] == []


async def test_structured_output_with_the_sdk_parse(tmp_path):
    class Address(BaseModel):
        city: str
        country: str

    class Person(BaseModel):
        name: str
        age: int
        address: Address

    answer = '{"name": "Ada", "age": 36, "address": {"city": "London", "country": "UK"}}'
    scripts = {"up-big": Script(tokens=[answer[:20], answer[20:]])}
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        reply = await gw.openai().chat.completions.parse(
            model="big", messages=[{"role": "user", "content": "Ada Lovelace"}],
            response_format=Person)
        person = reply.choices[0].message.parsed
        assert person == Person(name="Ada", age=36,
                                address=Address(city="London", country="UK"))
        (seen,) = gw.backends["up-big"].requests
        fmt = seen.response_format
        assert fmt.type == "json_schema" and fmt.name == "Person" and fmt.strict is True
        assert fmt.schema["properties"]["address"]["$ref"].endswith("Address")


async def test_a_model_output_that_cannot_be_made_valid(tmp_path):
    bad = BackendInvalidOutput("the model's output does not match the response_format schema")
    scripts = {"up-big": [Script(fail=bad), Script(tokens=TOKENS, fail=bad, fail_after=2)]}
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        r = await gw.chat(model="big", response_format={"type": "json_object"})
        assert r.status_code == 502
        assert r.json()["error"]["code"] == "model_output_invalid"
        assert "schema" in r.json()["error"]["message"]
        r = await gw.chat(model="big", response_format={"type": "json_object"}, stream=True)
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "model_output_invalid"


async def test_the_legacy_functions_api(tmp_path):
    # `functions`/`function_call` (deprecated by OpenAI, still sent by older clients) are
    # function tools; the call comes back as `message.function_call`, whole and streamed,
    # and the `function` message answering it goes back as the tool's answer.
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    rome = ToolCall("call_2", "get_weather", '{"city": "Rome"}')
    # the second script's upstream makes two calls all the same (some ignore
    # parallel_tool_calls: false): the legacy answer is the first, streamed as whole
    scripts = {"up-big": [Script(tool_calls=[call]), Script(tool_calls=[call, rome]),
                          Script(tokens=["Sunny", "."])]}
    fn = WEATHER["function"]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        client = gw.openai()
        reply = await client.chat.completions.create(
            model="big", messages=ask, functions=[fn], function_call={"name": "get_weather"})
        choice = reply.choices[0]
        assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
        assert choice.message.function_call.name == "get_weather"
        assert json.loads(choice.message.function_call.arguments) == {"city": "Paris"}
        seen = gw.backends["up-big"].requests[0]
        assert [t.name for t in seen.tools] == ["get_weather"]
        assert seen.tool_choice == NamedToolChoice("get_weather")
        assert seen.parallel_tool_calls is False

        names, args, finish = [], "", None
        async for chunk in await client.chat.completions.create(
                model="big", messages=ask, functions=[fn], stream=True):
            delta = chunk.choices[0].delta
            assert not delta.tool_calls
            if delta.function_call:
                names += [delta.function_call.name] if delta.function_call.name else []
                args += delta.function_call.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert names == ["get_weather"] and json.loads(args) == {"city": "Paris"}
        assert finish == "function_call"

        follow = [*ask, choice.message.model_dump(exclude_none=True),
                  {"role": "function", "name": "get_weather", "content": '{"sky": "sunny"}'}]
        final = await client.chat.completions.create(model="big", messages=follow,
                                                     functions=[fn])
        assert final.choices[0].message.content == "Sunny."
        assert final.choices[0].finish_reason == "stop"
        sent = gw.backends["up-big"].requests[2].messages
        assert sent[1]["tool_calls"] == [{"id": "fn0000001", "type": "function",
                                          "function": {"name": "get_weather",
                                                       "arguments": '{"city": "Paris"}'}}]
        assert sent[2] == {"role": "tool", "content": '{"sky": "sunny"}',
                           "tool_call_id": "fn0000001"}

        # a function message answers the function_call right before it, of that function
        lone = [*ask, {"role": "function", "name": "get_weather", "content": None}]
        r = await gw.chat(model="big", messages=lone, functions=[fn])
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1]"
        other = [*follow[:2], {"role": "function", "name": "get_time", "content": None}]
        r = await gw.chat(model="big", messages=other, functions=[fn])
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[2].name"
        # not with tools, and function_call only with functions
        r = await gw.chat(model="big", functions=[fn], tools=[WEATHER])
        assert r.status_code == 400 and r.json()["error"]["param"] == "functions"
        r = await gw.chat(model="big", function_call="auto")
        assert r.status_code == 400 and r.json()["error"]["param"] == "function_call"
        r = await gw.chat(model="big", functions=[fn], function_call={"name": "nope"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "function_call"
        assert len(gw.backends["up-big"].requests) == 3

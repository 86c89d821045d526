"""``POST /v1/responses`` in-process, with scripted backends: the Responses wire format on
the chat pipeline — string input and message items, ``instructions``, function tools and the
``function_call`` / ``function_call_output`` round trip, ``text.format`` json_schema,
``max_output_tokens`` → ``incomplete``; the streamed event sequence; invalid bodies (every
invalid field listed, the stateful fields refused); a backend failure mid-stream; budgets
charged exactly the joules reported. The official SDK's ``responses.create`` /
``responses.stream``, LangChain's ``ChatOpenAI(use_responses_api=True)`` and the OpenAI
Agents SDK drive the same app through the in-process transport.

Tier ``big`` costs 2 J per token, ``small`` 1 J (:mod:`tests.inprocess`)."""

from __future__ import annotations

import json

import httpx
import pytest

from backends.features import NamedToolChoice, ResponseFormat, ToolCall, ToolSpec

from .conftest import KEYS
from .inprocess import BASE_URL, InProcessGateway, in_process_small, joules, policy
from .scripted import Script

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

RESPONSES = "/v1/responses"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False},
           "strict": True}
CALL = ToolCall("call_abc123", "get_weather", '{"city": "Paris"}')


def sse(text: str) -> list[tuple[str, dict]]:
    """``(event name, data)`` of each Responses SSE event."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = block.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: "), block
        payload = json.loads(data[len("data: "):])
        assert payload["type"] == name[len("event: "):]
        events.append((payload["type"], payload))
    return events


async def test_string_input_answers_a_response_object(tmp_path):
    async with InProcessGateway(tmp_path, scripts={"up-big": Script(prompt_tokens=7)}) as gw:
        r = await gw.post(RESPONSES, {"model": "big", "input": "Say hello.",
                                      "instructions": "Be brief.", "max_output_tokens": 50,
                                      "metadata": {"k": "v"}, "store": False})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "response" and body["id"].startswith("resp_")
        assert body["status"] == "completed" and body["incomplete_details"] is None
        [item] = body["output"]
        assert item["type"] == "message" and item["role"] == "assistant"
        assert item["id"].startswith("msg_") and item["status"] == "completed"
        assert item["content"] == [{"type": "output_text", "text": "Hello, world.",
                                    "annotations": [], "logprobs": []}]
        usage = body["usage"]
        assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (7, 4, 11)
        assert usage["energy_joules"] == pytest.approx(joules(7, 4, "big"))
        assert usage["energy_source"] == "estimated"
        assert body["instructions"] == "Be brief." and body["max_output_tokens"] == 50
        assert body["metadata"] == {"k": "v"} and body["store"] is False
        assert body["tools"] == [] and body["tool_choice"] == "auto"
        assert r.headers["x-joulegate-tier"] == "big"
        assert float(r.headers["x-joulegate-energy-joules"]) == pytest.approx(joules(7, 4, "big"))
        [sent] = gw.backends["up-big"].requests
        assert sent.messages == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Say hello."}]
        assert sent.max_tokens == 50 and sent.tools is None


async def test_message_items_become_chat_messages(tmp_path):
    async with InProcessGateway(tmp_path) as gw:
        r = await gw.post(RESPONSES, {"model": "big", "input": [
            {"role": "developer", "content": "Answer in French."},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Hi"},
                         {"type": "input_text", "text": "there"}]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Bonjour", "annotations": []}]},
            {"role": "user", "content": "Again"}]})
        assert r.status_code == 200, r.text
        assert gw.backends["up-big"].requests[0].messages == [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hi\nthere"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Again"}]


async def test_function_tool_call_and_its_output_round_trip(tmp_path):
    scripts = {"up-big": [Script(tokens=[], tool_calls=[CALL]), Script(tokens=["Sunny", "."])]}
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        ask = [{"role": "user", "content": "Weather in Paris?"}]
        r = await gw.post(RESPONSES, {"model": "big", "input": ask, "tools": [WEATHER],
                                      "tool_choice": "required", "parallel_tool_calls": False})
        assert r.status_code == 200, r.text
        body = r.json()
        [item] = body["output"]
        assert item["type"] == "function_call" and item["id"].startswith("fc_")
        assert (item["call_id"], item["name"], item["arguments"], item["status"]) == (
            "call_abc123", "get_weather", '{"city": "Paris"}', "completed")
        assert body["tools"] == [WEATHER] and body["tool_choice"] == "required"
        assert body["parallel_tool_calls"] is False
        sent = gw.backends["up-big"].requests[0]
        assert sent.tools == [ToolSpec("get_weather", "Weather in a city", WEATHER["parameters"],
                                       True)]
        assert sent.tool_choice == "required" and sent.parallel_tool_calls is False

        # the client runs the function and sends the call and its output back
        r = await gw.post(RESPONSES, {"model": "big", "tools": [WEATHER], "input": [
            *ask, item, {"type": "function_call_output", "call_id": "call_abc123",
                         "output": '{"sky": "sunny"}'}]})
        assert r.status_code == 200, r.text
        assert r.json()["output"][0]["content"][0]["text"] == "Sunny."
        assert gw.backends["up-big"].requests[1].messages == [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL.to_openai()]},
            {"role": "tool", "tool_call_id": "call_abc123", "content": '{"sky": "sunny"}'}]


async def test_named_tool_choice_and_text_format_json_schema(tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    async with InProcessGateway(tmp_path) as gw:
        r = await gw.post(RESPONSES, {"model": "big", "input": "x", "tools": [WEATHER],
                                      "tool_choice": {"type": "function", "name": "get_weather"}})
        assert r.status_code == 200, r.text
        assert r.json()["tool_choice"] == {"type": "function", "name": "get_weather"}
        assert gw.backends["up-big"].requests[0].tool_choice == NamedToolChoice("get_weather")

        r = await gw.post(RESPONSES, {"model": "big", "input": "x", "text": {"format": {
            "type": "json_schema", "name": "count", "schema": schema, "strict": True}}})
        assert r.status_code == 200, r.text
        assert r.json()["text"]["format"] == {"type": "json_schema", "name": "count",
                                              "schema": schema, "strict": True,
                                              "description": None}
        assert gw.backends["up-big"].requests[1].response_format == ResponseFormat(
            "json_schema", "count", schema, True)


async def test_max_output_tokens_cut_is_incomplete(tmp_path):
    async with InProcessGateway(tmp_path) as gw:
        r = await gw.post(RESPONSES, {"model": "big", "input": "x", "max_output_tokens": 2})
        body = r.json()
        assert body["status"] == "incomplete"
        assert body["incomplete_details"] == {"reason": "max_output_tokens"}
        assert body["output"][0]["status"] == "incomplete"
        assert body["output"][0]["content"][0]["text"] == "Hello,"
        assert body["usage"]["output_tokens"] == 2


async def test_streamed_event_sequence(tmp_path):
    scripts = {"up-big": Script(tokens=["Let", " me", " check", "."], tool_calls=[CALL],
                                prompt_tokens=9)}
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        r = await gw.post(RESPONSES, {"model": "big", "input": "Weather?", "stream": True,
                                      "tools": [WEATHER]})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.text)
    kinds = [k for k, _ in events]
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", *["response.function_call_arguments.delta"] * 2,
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    data = dict(events)
    created = data["response.created"]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    text = "".join(e["delta"] for k, e in events if k == "response.output_text.delta")
    assert text == "Let me check." == data["response.output_text.done"]["text"]
    args = "".join(e["delta"] for k, e in events if k == "response.function_call_arguments.delta")
    assert args == CALL.arguments == data["response.function_call_arguments.done"]["arguments"]
    added = [e for k, e in events if k == "response.output_item.added"]
    assert [a["output_index"] for a in added] == [0, 1]
    assert added[1]["item"]["call_id"] == "call_abc123"
    done = data["response.completed"]["response"]
    assert done["id"] == created["id"] and done["status"] == "completed"
    assert [o["type"] for o in done["output"]] == ["message", "function_call"]
    assert done["output"][1]["arguments"] == CALL.arguments
    usage = done["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (9, 6)
    assert usage["energy_joules"] == pytest.approx(joules(9, 6, "big"))


async def test_streamed_cut_ends_with_response_incomplete(tmp_path):
    async with InProcessGateway(tmp_path) as gw:
        r = await gw.post(RESPONSES, {"model": "big", "input": "x", "stream": True,
                                      "max_output_tokens": 3})
        events = sse(r.text)
    assert events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_backend_failure_mid_stream_is_response_failed(tmp_path):
    async with InProcessGateway(tmp_path, scripts={"up-big": Script.broken_after(2)}) as gw:
        r = await gw.post(RESPONSES, {"model": "big", "input": "x", "stream": True})
        assert r.status_code == 200
        events = sse(r.text)
        kind, failed = events[-1]
        assert kind == "response.failed"
        assert failed["response"]["status"] == "failed"
        assert failed["response"]["error"]["code"] == "server_error"
        assert "dropped the connection" in failed["response"]["error"]["message"]
        assert failed["response"]["usage"]["output_tokens"] == 2
        assert await gw.metric("joulegate_requests_total", tier="big", status="502") == 1


async def test_every_invalid_field_is_listed(tmp_path):
    async with InProcessGateway(tmp_path) as gw:
        r = await gw.post(RESPONSES, {
            "model": "big", "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": "http://x"}]}],
            "frobnicate": 1, "temperature": 7,
            "tools": [{"type": "web_search"}]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        for name in ("frobnicate", "temperature", "tools[0].type", "input[0].content[0]"):
            assert name in err["message"], (name, err["message"])
        assert err["message"].startswith("4 invalid fields"), err["message"]


async def test_stateful_fields_are_refused(tmp_path):
    async with InProcessGateway(tmp_path) as gw:
        r = await gw.post(RESPONSES, {"model": "big", "input": "x",
                                      "previous_response_id": "resp_1"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "previous_response_id" and "stores no responses" in err["message"]
        r = await gw.post(RESPONSES, {"model": "big", "input": [
            {"type": "function_call_output", "call_id": "call_x", "output": "1"}]})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "input[0].call_id"
        r = await gw.post(RESPONSES, {"model": "big", "input": [
            {"type": "item_reference", "id": "msg_1"}]})
        assert r.status_code == 400 and "item_reference" in r.json()["error"]["message"]


async def test_dropped_fields_are_named(tmp_path):
    async with InProcessGateway(tmp_path) as gw:
        r = await gw.post(RESPONSES, {"model": "big", "input": "x", "store": True,
                                      "reasoning": {"effort": "low"}, "include": ["x.y"],
                                      "truncation": "disabled"})
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-dropped-params"] == "reasoning,include,store"
        assert r.json()["store"] is False


async def test_budget_charged_what_usage_reports(tmp_path):
    scripts = {"up-big": [Script(prompt_tokens=12, tokens=["a"] * 3),
                          Script(prompt_tokens=5, tokens=["b"] * 6)]}
    budgeted = policy({"budgets": [{"window": "1d", "joules": 10_000}]})
    async with InProcessGateway(tmp_path, budgeted, scripts) as gw:
        whole = (await gw.post(RESPONSES, {"model": "big", "input": "x"})).json()
        streamed = sse((await gw.post(RESPONSES, {"model": "big", "input": "x",
                                                  "stream": True})).text)
        reported = [whole["usage"]["energy_joules"],
                    streamed[-1][1]["response"]["usage"]["energy_joules"]]
        assert reported == [joules(12, 3, "big"), joules(5, 6, "big")]
        window = (await gw.budget())["1d"]
        assert window["spent_joules"] == pytest.approx(sum(reported))
        assert window["reserved_joules"] == 0


# -- the clients -------------------------------------------------------------------------

async def test_official_sdk_create_and_stream(tmp_path):
    scripts = {"up-big": [Script(), Script(tokens=[], tool_calls=[CALL]), Script()]}
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        client = gw.openai()
        reply = await client.responses.create(model="big", input="Hi", max_output_tokens=20)
        assert reply.output_text == "Hello, world." and reply.status == "completed"
        assert reply.usage.total_tokens == 14
        assert reply.usage.model_extra["energy_joules"] > 0

        called = await client.responses.create(model="big", input="Weather?", tools=[WEATHER],
                                               tool_choice="required")
        [fc] = called.output
        assert fc.type == "function_call" and json.loads(fc.arguments) == {"city": "Paris"}

        async with client.responses.stream(model="big", input="Hi") as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_response()
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert final.output_text == "Hello, world."


def _http_client(gw: InProcessGateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app), base_url=BASE_URL,
                             timeout=30)


async def test_langchain_chat_openai_use_responses_api(tmp_path):
    langchain_openai = pytest.importorskip("langchain_openai")
    scripts = {"up-big": [Script(), Script(tokens=[], tool_calls=[CALL]), Script()]}
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        llm = langchain_openai.ChatOpenAI(
            model="big", base_url=f"{BASE_URL}/v1", api_key=KEYS["acme"], max_retries=0,
            use_responses_api=True, http_async_client=_http_client(gw))
        reply = await llm.ainvoke("Hi")
        assert reply.text == "Hello, world."
        tooled = await llm.bind_tools([WEATHER], tool_choice="required").ainvoke("Weather?")
        assert tooled.tool_calls[0]["name"] == "get_weather"
        assert tooled.tool_calls[0]["args"] == {"city": "Paris"}
        chunks = [c async for c in llm.astream("Hi")]
        assert "".join(c.text for c in chunks) == "Hello, world."


async def test_openai_agents_sdk_runner_with_a_function_tool(tmp_path):
    agents = pytest.importorskip("agents")
    scripts = {"up-big": [Script(tokens=[], tool_calls=[CALL]), Script(tokens=["Sunny", "."])]}
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        agents.set_tracing_disabled(True)
        seen = []

        @agents.function_tool
        def get_weather(city: str) -> str:
            """Weather in a city."""
            seen.append(city)
            return "sunny"

        model = agents.OpenAIResponsesModel(model="big", openai_client=gw.openai())
        agent = agents.Agent(name="weather", instructions="Use the tools.", tools=[get_weather],
                             model=model)
        result = await agents.Runner.run(agent, "Weather in Paris?")
        assert seen == ["Paris"] and result.final_output == "Sunny."
        second = gw.backends["up-big"].requests[1].messages
        assert [m["role"] for m in second] == ["system", "user", "assistant", "tool"]
        assert second[3]["content"] == "sunny"

        streamed = agents.Runner.run_streamed(agent, "Weather in Paris?")
        async for _ in streamed.stream_events():
            pass
        assert streamed.final_output


async def test_a_client_that_leaves_mid_stream_stops_generation_and_is_charged(tmp_path):
    from .inprocess import auth, stream_then_disconnect, until

    slow = Script(tokens=["a"] * 50, token_delay_s=0.01, prompt_tokens=4)
    async with InProcessGateway(tmp_path, scripts={"up-big": slow}) as gw:
        status, bodies = await stream_then_disconnect(
            gw.app, RESPONSES, {"model": "big", "input": "x", "stream": True}, auth(), 2)
        assert status == 200 and bodies[0].startswith(b"event: response.created")
        [record] = gw.backends["up-big"].calls.streams
        await until(lambda: record.closed_early, "the backend stream closed")
        assert await gw.metric("joulegate_requests_total", tier="big", status="499") == 1
        assert record.tokens_sent < 50


async def test_reasoning_items_from_another_model_are_accepted_and_not_passed_on(tmp_path):
    # The Agents SDK hands a reasoning agent's turns to the next agent as input items,
    # reasoning included (openai-agents-python #569, #722); refusing them broke a handoff
    # from an agent on a reasoning model to one served here.
    reasoning = {"type": "reasoning", "id": "rs_1", "status": "completed",
                 "summary": [{"type": "summary_text", "text": "The user wants the weather."}],
                 "encrypted_content": "gAAAAB..."}
    async with InProcessGateway(tmp_path) as gw:
        r = await gw.post(RESPONSES, {"model": "big", "tools": [WEATHER], "input": [
            {"role": "user", "content": "Weather in Paris?"}, reasoning,
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "reasoning", "id": "rs_2", "summary": []},
            {"role": "user", "content": "And tomorrow?"}]})
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-dropped-params"] == "input[1],input[4]"
        sent = gw.backends["up-big"].requests[0].messages
        assert [m["role"] for m in sent] == ["user", "assistant", "tool", "user"]
        assert "wants" not in json.dumps(sent)  # the summary text went nowhere
        # Still checked: a field a reasoning item does not have, or nothing but reasoning.
        r = await gw.post(RESPONSES, {"model": "big", "input": [{**reasoning, "colour": 1}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].colour"
        r = await gw.post(RESPONSES, {"model": "big", "input": [reasoning]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "input"


# -- log-probabilities -------------------------------------------------------------------

LOGPROBS = ["message.output_text.logprobs"]


async def test_included_logprobs_are_on_the_output_text_whole_and_streamed(tmp_path):
    scripts = {"up-big": [Script(token_logprobs=[-0.5, -1.5]), Script()]}
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        r = await gw.post(RESPONSES, {"model": "big", "input": "Hi", "include": LOGPROBS,
                                      "top_logprobs": 2})
        assert r.status_code == 200, r.text
        assert "x-joulegate-dropped-params" not in r.headers
        body = r.json()
        [part] = body["output"][0]["content"]
        assert [e["token"] for e in part["logprobs"]] == ["Hello", ",", " world", "."]
        assert [e["logprob"] for e in part["logprobs"]] == [-0.5, -1.5, -0.25, -0.25]
        first = part["logprobs"][0]
        assert first["bytes"] == list(b"Hello")
        assert [t["token"] for t in first["top_logprobs"]] == ["Hello", "alt1"]
        assert body["top_logprobs"] == 2
        (seen,) = gw.backends["up-big"].requests
        assert seen.logprobs and seen.top_logprobs == 2

        r = await gw.post(RESPONSES, {"model": "big", "input": "Hi", "include": LOGPROBS,
                                      "top_logprobs": 2, "stream": True})
        events = sse(r.text)
    deltas = [e for k, e in events if k == "response.output_text.delta"]
    assert [[x["token"] for x in d["logprobs"]] for d in deltas] == [
        ["Hello"], [","], [" world"], ["."]]
    assert [[t["token"] for t in x["top_logprobs"]] for d in deltas for x in d["logprobs"]] == [
        ["Hello", "alt1"], [",", "alt1"], [" world", "alt1"], [".", "alt1"]]
    data = dict(events)
    whole = [x["token"] for x in data["response.output_text.done"]["logprobs"]]
    assert whole == ["Hello", ",", " world", "."]
    assert data["response.content_part.done"]["part"]["logprobs"] == (
        data["response.output_text.done"]["logprobs"])
    done = data["response.completed"]["response"]
    assert done["output"][0]["content"][0]["logprobs"] == (
        data["response.output_text.done"]["logprobs"])


async def test_a_tool_calls_tokens_are_not_output_text(tmp_path):
    # The backend reports log-probabilities for the call's tokens too (llama.cpp does): they
    # are no part of the message, whole or streamed, and open no message of their own.
    text = ["Let", " me", " check", "."]
    scripts = {"up-big": [Script(tokens=text, tool_calls=[CALL, CALL]),
                          Script(tokens=text, tool_calls=[CALL, CALL])]}
    ask = {"model": "big", "input": "Weather?", "tools": [WEATHER], "include": LOGPROBS}
    async with InProcessGateway(tmp_path, scripts=scripts) as gw:
        whole = (await gw.post(RESPONSES, ask)).json()
        events = sse((await gw.post(RESPONSES, {**ask, "stream": True})).text)
    assert [o["type"] for o in whole["output"]] == ["message", "function_call", "function_call"]
    assert [e["token"] for e in whole["output"][0]["content"][0]["logprobs"]] == text
    done = dict(events)["response.completed"]["response"]
    assert [o["type"] for o in done["output"]] == ["message", "function_call", "function_call"]
    assert done["output"][0]["content"][0]["logprobs"] == (
        whole["output"][0]["content"][0]["logprobs"])
    added = [e["item"]["type"] for k, e in events if k == "response.output_item.added"]
    assert added == ["message", "function_call", "function_call"]


async def test_top_logprobs_without_the_include_returns_none_and_says_so(tmp_path):
    async with InProcessGateway(tmp_path) as gw:
        r = await gw.post(RESPONSES, {"model": "big", "input": "Hi", "top_logprobs": 3})
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-dropped-params"] == "top_logprobs"
        assert r.json()["output"][0]["content"][0]["logprobs"] == []
        (seen,) = gw.backends["up-big"].requests
        assert not seen.logprobs and seen.top_logprobs is None
        r = await gw.post(RESPONSES, {"model": "big", "input": "Hi", "top_logprobs": 21,
                                      "include": LOGPROBS})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "top_logprobs"


async def test_routed_only_among_tiers_with_every_capability_used(tmp_path):
    p = in_process_small(policy({"default_tier": "small"}), ["logprobs", "structured_output"])
    async with InProcessGateway(tmp_path, p) as gw:
        r = await gw.post(RESPONSES, {"model": "auto", "input": "Hi"})
        assert r.headers["x-joulegate-tier"] == "small"
        r = await gw.post(RESPONSES, {"model": "auto", "input": "Hi", "include": LOGPROBS})
        assert r.status_code == 200 and r.headers["x-joulegate-tier"] == "big"
        assert len(r.json()["output"][0]["content"][0]["logprobs"]) == 4
        # tools the small tier has, a format it has not: both count
        r = await gw.post(RESPONSES, {"model": "auto", "input": "Weather?", "tools": [WEATHER],
                                      "text": {"format": {"type": "json_object"}}})
        assert r.status_code == 200 and r.headers["x-joulegate-tier"] == "big"
        r = await gw.post(RESPONSES, {"model": "small", "input": "Hi", "include": LOGPROBS})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "capability_missing" and "'logprobs'" in err["message"]


def test_every_logprob_carries_its_utf8_bytes():
    from backends.features import TokenLogprob, TopLogprob
    from gateway.responses import response_logprobs
    [entry] = response_logprobs([TokenLogprob("é", -0.1, None, [TopLogprob("e", -2.5)])])
    assert entry == {"token": "é", "logprob": -0.1, "bytes": [0xC3, 0xA9],
                     "top_logprobs": [{"token": "e", "logprob": -2.5, "bytes": [0x65]}]}
    assert response_logprobs(None) == []


async def test_the_cascade_escalates_a_response_as_it_does_a_chat_completion(tmp_path):
    from .test_cascade import SURE, UNSURE, cascade_policy
    from .test_cascade import scripts as cascade_scripts

    async with InProcessGateway(tmp_path, cascade_policy(budget=10_000),
                                cascade_scripts(UNSURE)) as gw:
        r = await gw.post(RESPONSES, {"model": "auto", "input": "What is 2 + 2?",
                                      "max_output_tokens": 16})
        assert r.status_code == 200, r.text
        assert r.headers["x-joulegate-cascade"] == "small->big"
        body = r.json()
        assert body["output"][0]["content"][0]["text"] == "Four."
        # the probe's joules and the answer's, once each
        want = joules(10, 2, "small") + joules(10, 2, "big")
        assert body["usage"]["energy_joules"] == pytest.approx(want)
        assert (await gw.budget())["1d"]["spent_joules"] == pytest.approx(want)
        r = await gw.post(RESPONSES, {"model": "auto", "input": "What is 2 + 2?",
                                      "max_output_tokens": 16, "stream": True})
        assert r.headers["x-joulegate-cascade"] == "small->big"
        done = dict(sse(r.text))["response.completed"]["response"]
        assert done["output"][0]["content"][0]["text"] == "Four."
    (tmp_path / "sure").mkdir()
    async with InProcessGateway(tmp_path / "sure", cascade_policy(), cascade_scripts(SURE)) as gw:
        r = await gw.post(RESPONSES, {"model": "auto", "input": "What is 2 + 2?",
                                      "max_output_tokens": 16, "stream": True})
        assert r.headers["x-joulegate-cascade"] == "small"
        deltas = [e["delta"] for k, e in sse(r.text) if k == "response.output_text.delta"]
        assert "".join(deltas) == "The answer is 4."
        assert all(e["logprobs"] == [] for k, e in sse(r.text)
                   if k == "response.output_text.delta")  # the probe's, not the client's


async def test_a_responses_body_is_judged_by_its_own_field_names(tmp_path):
    # On an in-process tier chat's `user` is an unused pass-through field (named, or refused
    # for a `reject` tenant); a Responses body's fields are judged when it is read, by the
    # names it was sent with, never by chat's.
    p = in_process_small(policy({"unsupported_params": "reject"}))
    async with InProcessGateway(tmp_path, p) as gw:
        assert (await gw.chat(model="small", user="u1")).status_code == 400
        r = await gw.post(RESPONSES, {"model": "small", "user": "u1", "input": [
            {"role": "user", "content": "Weather?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather",
             "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]})
        assert r.status_code == 200, r.text
        assert "x-joulegate-dropped-params" not in r.headers
        # the Responses API's own dropped fields are refused too, all named in one 400
        asked = len(gw.backends["up-small"].requests)
        r = await gw.post(RESPONSES, {"model": "small", "input": "Hi", "store": True,
                                      "reasoning": {"effort": "low"}})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "unsupported_parameter" and err["param"] == "reasoning"
        assert "'store'" in err["message"] and "'reasoning'" in err["message"]
        assert len(gw.backends["up-small"].requests) == asked  # nothing was asked

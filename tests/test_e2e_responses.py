"""``POST /v1/responses`` end to end: a real ``joulegate serve`` process on the real Qwen
0.5B (llama.cpp in-process), driven by the official SDK (``responses.create``,
``responses.stream``), LangChain's ``ChatOpenAI(use_responses_api=True)`` and the OpenAI
Agents SDK's Responses model with a function tool.

The small model's wording is not asserted, only the protocol: the tool is called with JSON
arguments that parse, runs complete, final outputs are non-empty, usage carries joules."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from .conftest import KEYS, Gateway, llamacpp_policy

pytestmark = pytest.mark.e2e

WEATHER = {"type": "function", "name": "get_weather",
           "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False},
           "strict": True}


@pytest.fixture(scope="module")
def gw(tmp_path_factory, small_model_path) -> Iterator[Gateway]:
    # Agent SDK requests carry the tools' schemas and the whole conversation.
    gateway = Gateway(llamacpp_policy(max_body_bytes=1 << 16),
                      tmp_path_factory.mktemp("responses")).start()
    yield gateway
    gateway.stop()


def test_sdk_create_text_and_a_required_function_call(gw):
    client = gw.client()
    reply = client.responses.create(model="small", input="Say hello in three words.",
                                    instructions="You are terse.", max_output_tokens=24,
                                    temperature=0)
    assert reply.status in ("completed", "incomplete") and reply.output_text.strip()
    assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0
    assert reply.usage.model_extra["energy_joules"] > 0

    called = client.responses.create(model="small", input="What's the weather in Paris?",
                                     tools=[WEATHER], tool_choice="required",
                                     max_output_tokens=60, temperature=0)
    [call] = [o for o in called.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    assert isinstance(json.loads(call.arguments)["city"], str)

    # the round trip: the call and its output go back; the model answers in text
    after = client.responses.create(model="small", tools=[WEATHER], max_output_tokens=40,
                                    temperature=0, input=[
                                        {"role": "user", "content": "What's the weather in Paris?"},
                                        call.model_dump(exclude_none=True),
                                        {"type": "function_call_output", "call_id": call.call_id,
                                         "output": '{"sky": "sunny", "celsius": 21}'}])
    assert after.status in ("completed", "incomplete") and after.output


def test_sdk_stream_events(gw):
    client = gw.client()
    with client.responses.stream(model="small", input="Count to five.", max_output_tokens=24,
                                 temperature=0) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert text and done.text == text
    assert events[-1].response.usage.model_extra["energy_joules"] > 0


def test_sdk_logprobs_of_the_real_model(gw):
    client = gw.client()
    ask = {"model": "small", "input": "Say hello in three words.", "max_output_tokens": 8,
           "temperature": 0, "include": ["message.output_text.logprobs"], "top_logprobs": 3}
    reply = client.responses.create(**ask)
    [part] = reply.output[0].content
    # one entry per token of the text: their bytes spell it
    assert 1 <= len(part.logprobs) <= reply.usage.output_tokens
    assert bytes(b for e in part.logprobs for b in e.bytes).decode() == part.text
    for entry in part.logprobs:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
    with client.responses.stream(**ask) as stream:
        events = list(stream)
    streamed = [x for e in events if e.type == "response.output_text.delta" for x in e.logprobs]
    assert [x.token for x in streamed] == [e.token for e in part.logprobs]
    # The same values, up to llama.cpp's arithmetic: a prompt read again from the prefix
    # cache (as it is when this test runs alone) is summed in another order, ~0.05 apart.
    assert [x.logprob for x in streamed] == pytest.approx(
        [e.logprob for e in part.logprobs], abs=0.15)


def test_sdk_logprobs_with_a_required_function_call(gw):
    # llama.cpp reports the call's own tokens' log-probabilities too: they are not output
    # text, so no (empty) message item appears for them, whole or streamed.
    client = gw.client()
    ask = {"model": "small", "input": "What's the weather in Paris?", "tools": [WEATHER],
           "tool_choice": "required", "max_output_tokens": 60, "temperature": 0,
           "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    whole = client.responses.create(**ask)
    with client.responses.stream(**ask) as stream:
        events = list(stream)
    final = events[-1].response
    for reply in (whole, final):
        kinds = [o.type for o in reply.output]
        assert "function_call" in kinds
        for item in reply.output:
            if item.type == "message":  # text before the call, if any: spelled by its bytes
                [part] = item.content
                assert part.text and bytes(b for e in part.logprobs for b in e.bytes).decode() \
                    == part.text
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == [o.type for o in final.output]


def test_langchain_chat_openai_responses_api(gw):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model="small", base_url=f"{gw.url}/v1",
                                      api_key=KEYS["acme"], use_responses_api=True,
                                      max_retries=0, temperature=0, max_tokens=40)
    reply = llm.invoke("Say hello.")
    assert reply.text.strip()
    tooled = llm.bind_tools([WEATHER], tool_choice="required").invoke(
        "What's the weather in Paris?")
    [call] = tooled.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)


def test_openai_agents_sdk_with_a_function_tool(gw):
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        seen.append(city)
        return f"It is sunny and 21 degrees in {city}."

    client = AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=KEYS["acme"], max_retries=0,
                         timeout=120)
    agent = agents.Agent(
        name="weather", instructions="Answer with the get_weather tool.", tools=[get_weather],
        model=agents.OpenAIResponsesModel(model="small", openai_client=client),
        # the first turn must call the tool; the SDK resets the choice to auto after it
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0,
                                            max_tokens=60))
    result = agents.Runner.run_sync(agent, "What's the weather in Paris?", max_turns=6)
    assert seen and all(isinstance(city, str) and city for city in seen)
    assert str(result.final_output).strip()

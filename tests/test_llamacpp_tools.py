"""Tools, structured output and logprobs on the in-process llama.cpp backend, with the real
Qwen2.5-Coder 0.5B: grammar-forced calls, the auto mode's parser, a tool round trip, JSON
checked against its schema, streamed tool-call deltas and per-token log-probabilities."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from backends import GenerationRequest
from backends.features import NamedToolChoice, ResponseFormat, ToolSpec
from backends.llamacpp import LlamaCppBackend, LlamaCppSettings
from backends.tool_calls import template_messages

from .conftest import SMALL_MODEL

pytestmark = pytest.mark.e2e

WEATHER = ToolSpec("get_weather", "Get the current weather in a city",
                   {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"], "additionalProperties": False})
TIME = ToolSpec("get_time", "Get the current time in a time zone",
                {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]})
ASK = [{"role": "user", "content": "What's the weather like in Paris today?"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                    "required": ["city", "country"], "additionalProperties": False},
        "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "address", "languages"],
    "additionalProperties": False,
}


def chat(messages, **fields) -> GenerationRequest:
    return GenerationRequest(model="m", messages=messages, temperature=0,
                             max_tokens=fields.pop("max_tokens", 60), **fields)


def run(body):
    async def main():
        backend = LlamaCppBackend("q", LlamaCppSettings(model=SMALL_MODEL, n_ctx=2048,
                                                        n_threads=2))
        await backend.start()
        try:
            await body(backend)
        finally:
            await backend.close()

    asyncio.run(main())


def test_forced_and_named_tool_calls(small_model_path):
    async def body(backend):
        required = await backend.complete(chat(ASK, tools=[WEATHER, TIME], tool_choice="required"))
        assert required.finish_reason == "tool_calls" and required.text == ""
        [call] = required.tool_calls
        args = json.loads(call.arguments)
        assert call.name == "get_weather" and call.id.startswith("call_")
        assert isinstance(args["city"], str) and args["city"]
        jsonschema.validate(args, WEATHER.parameters)

        # named: the grammar forces this function even when the prompt is about another
        named = await backend.complete(chat([{"role": "user", "content": "What time is it?"}],
                                            tools=[WEATHER, TIME],
                                            tool_choice=NamedToolChoice("get_weather")))
        assert [c.name for c in named.tool_calls] == ["get_weather"]
        jsonschema.validate(json.loads(named.tool_calls[0].arguments), WEATHER.parameters)

    run(body)


def test_auto_calls_the_tool_a_question_needs(small_model_path):
    async def body(backend):
        out = await backend.complete(chat(ASK, tools=[WEATHER, TIME]))
        assert out.finish_reason == "tool_calls"
        [call] = out.tool_calls
        assert call.name == "get_weather" and "paris" in json.loads(call.arguments)["city"].lower()
        # tool_choice none: the tools are not shown and nothing is parsed as a call
        plain = await backend.complete(chat([{"role": "user", "content": "Say hello."}],
                                            tools=[WEATHER], tool_choice="none", max_tokens=8))
        assert plain.tool_calls is None and plain.text

    run(body)


def test_tool_round_trip(small_model_path):
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 23, "sky": "sunny"}'},
    ]

    async def body(backend):
        # the GGUF's own template renders the call (arguments as an object) and the result
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = backend._base  # the loaded Llama: its GGUF metadata
        template = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], "<|im_end|>", "")
        prompt = template(messages=template_messages(history), tools=[WEATHER.to_openai()]).prompt
        assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                '</tool_call>') in prompt
        assert '<tool_response>\n{"temperature_c": 23, "sky": "sunny"}\n</tool_response>' in prompt
        out = await backend.complete(chat(history, tools=[WEATHER], max_tokens=40))
        assert out.tool_calls is None  # no new call: the model answers with the result
        assert "23" in out.text

    run(body)


def test_structured_outputs(small_model_path):
    async def body(backend):
        fmt = ResponseFormat("json_schema", "person", PERSON, strict=True)
        out = await backend.complete(chat(
            [{"role": "user", "content": "Describe Ana, 31, who lives in Lisbon, Portugal and "
                                         "speaks Portuguese and English."}],
            response_format=fmt, max_tokens=120))
        value = json.loads(out.text)
        jsonschema.validate(value, PERSON)
        assert value["age"] == 31

        obj = await backend.complete(chat([{"role": "user", "content": "A cat as JSON."}],
                                          response_format=ResponseFormat("json_object")))
        assert isinstance(json.loads(obj.text), dict)

        # Cut by max_tokens inside the JSON: as OpenAI answers it, the JSON so far with
        # finish_reason "length" (the client asked for that few tokens; an error would be
        # retried by SDKs for the same cut answer). Greedy: a prefix of the whole answer.
        ana = [{"role": "user", "content": "Ana, 31, Lisbon."}]
        whole = await backend.complete(chat(ana, response_format=fmt, max_tokens=120))
        cut = await backend.complete(chat(ana, response_format=fmt, max_tokens=4))
        assert (cut.finish_reason, cut.usage.completion_tokens) == ("length", 4)
        assert cut.text and whole.text.startswith(cut.text) and cut.text != whole.text
        chunks = [c async for c in backend.stream(chat(ana, response_format=fmt, max_tokens=4))]
        assert "".join(c.text for c in chunks) == cut.text
        assert chunks[-1].finish_reason == "length"

    run(body)


def test_a_tool_call_cut_by_max_tokens_comes_back_as_far_as_it_got(small_model_path):
    async def body(backend):
        req = {"tools": [WEATHER, TIME], "tool_choice": "required"}
        [whole] = (await backend.complete(chat(ASK, **req))).tool_calls
        # "<tool_call>", a newline, then the call's JSON, a few characters per token
        for tokens in (2, 12):
            cut = await backend.complete(chat(ASK, max_tokens=tokens, **req))
            assert cut.finish_reason == "length"
            calls = cut.tool_calls or []
            assert [c.name for c in calls] == ([] if tokens == 2 else [whole.name])
            chunks = [c async for c in backend.stream(chat(ASK, max_tokens=tokens, **req))]
            assert chunks[-1].finish_reason == "length"
            deltas = [d for c in chunks for d in c.tool_calls or ()]
            assert [d.name for d in deltas if d.name] == [c.name for c in calls]
            assert "".join(d.arguments for d in deltas) == "".join(c.arguments for c in calls)
            assert not any(c.text for c in chunks) and cut.text == ""
        assert calls[0].arguments != whole.arguments

    run(body)


def test_streamed_tool_call_deltas_reassemble_to_the_same_call(small_model_path):
    async def body(backend):
        req = {"tools": [WEATHER, TIME], "tool_choice": "required"}
        whole = await backend.complete(chat(ASK, **req))
        chunks = [c async for c in backend.stream(chat(ASK, **req))]
        deltas = [d for c in chunks for d in c.tool_calls or ()]
        assert deltas[0].id and deltas[0].name == "get_weather" and deltas[0].arguments == ""
        assert {d.index for d in deltas} == {0}
        assert all(d.id is None and d.name is None for d in deltas[1:])
        arguments = "".join(d.arguments for d in deltas)
        assert ("get_weather", arguments) == (whole.tool_calls[0].name,
                                              whole.tool_calls[0].arguments)
        assert chunks[-1].finish_reason == "tool_calls" and chunks[-1].usage.completion_tokens
        assert not any(c.text for c in chunks)

    run(body)


def test_logprobs(small_model_path):
    async def body(backend):
        out = await backend.complete(chat([{"role": "user", "content": "Say hi."}],
                                          logprobs=True, top_logprobs=3, max_tokens=6))
        assert len(out.logprobs) == out.usage.completion_tokens
        assert "".join(e.token for e in out.logprobs) == out.text
        for entry in out.logprobs:
            assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
            assert len(entry.top_logprobs) == 3
            tops = [t.logprob for t in entry.top_logprobs]
            assert tops == sorted(tops, reverse=True)
            assert entry.top_logprobs[0].token == entry.token  # greedy: the best token won

        chunks = [c async for c in backend.stream(chat(
            [{"role": "user", "content": "Say hi."}], logprobs=True, top_logprobs=0, max_tokens=6))]
        entries = [e for c in chunks for e in c.logprobs or ()]
        assert len(entries) == chunks[-1].usage.completion_tokens
        assert "".join(e.token for e in entries) == "".join(c.text for c in chunks)
        assert all(e.top_logprobs == [] for e in entries)

        plain = await backend.complete(chat([{"role": "user", "content": "Say hi."}], max_tokens=2))
        assert plain.logprobs is None

    run(body)

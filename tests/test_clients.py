"""The client matrix (issue 16): real client libraries, unchanged, against a real gateway on
the real Qwen2.5-Coder 0.5B GGUF — the official ``openai`` SDK, ``langchain-openai``,
``openai-agents`` and the ``litellm`` SDK; tools (and the legacy ``functions``), structured
output and the Responses API, whole and streamed.

One gateway process serves two tiers, and every test runs on both (``model=`` pins it):

* ``embedded`` — tier ``small``: the model in-process with llama.cpp, as in the embedded
  default policy;
* ``upstream`` — tier ``upstream``: a ``kind: openai`` backend whose upstream is a second,
  real ``joulegate serve`` process (llama.cpp tier ``backstage`` on the same GGUF), so every
  request also crosses the OpenAI HTTP wire (``POST {base_url}/chat/completions``) with its
  tool, tool-choice and response-format fields passed through. llama.cpp's own
  ``llama_cpp.server`` is not that upstream: with ``--chat_format chatml-function-calling``
  it only honours ``tool_choice`` ``auto`` or a named function (``required`` fails an
  assertion inside its handler), and its ``response_format`` knows ``json_object`` (with a
  ``schema``) but not OpenAI's ``json_schema``, which ``chat.completions.parse`` and
  LangChain's ``with_structured_output`` send.

The model is small: the tests assert on protocol — a function was called with JSON
arguments that validate against its schema, parsed objects validate, a tool's result
reaches the model, runs complete — and use ``tool_choice: required`` where the test is about
tool plumbing (the backend then constrains the output to a call with a grammar). LangChain's
``OpenAIEmbeddings`` is covered by ``tests/test_e2e_embeddings.py``. Nothing here reaches
the internet: LiteLLM reads its bundled model-cost map (``LITELLM_LOCAL_MODEL_COST_MAP``)
and the Agents SDK's tracing (which would export to OpenAI) is off.
"""

from __future__ import annotations

import asyncio
import json
import os

import jsonschema
import pytest
from pydantic import BaseModel

from .conftest import (
    KEYS,
    SMALL_MODEL,
    SMALL_MODEL_ID,
    Gateway,
    access_records,
    key_digest,
    tenant,
    wait_until,
)

pytestmark = pytest.mark.e2e

# Read by litellm at import: the cost map it ships, not a download.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

#: The parametrization: which tier each client call pins.
TIERS = {"embedded": "small", "upstream": "upstream"}
tiers = pytest.mark.parametrize("tier", list(TIERS.values()), ids=list(TIERS))

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}},
                  "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function",
           "function": {"name": "get_weather", "description": "Get the current weather in a city",
                        "parameters": WEATHER_PARAMS}}
ASK = [{"role": "user", "content": "What's the weather like in Paris today?"}]
#: What the tool "returns"; the final answers are checked for the number in it.
RESULT = '{"temperature_c": 23, "sky": "sunny"}'


class City(BaseModel):
    name: str
    country: str


CITY_PROMPT = [{"role": "user", "content": "Paris is the capital of France. Give the city and "
                                           "its country as JSON."}]


def llamacpp_backend() -> dict:
    return {"kind": "llamacpp", "model": SMALL_MODEL, "n_ctx": 4096, "slots": 1, "max_queue": 8,
            "queue_timeout_s": 300, "n_threads": 2}


def upstream_policy(state: str) -> dict:
    """The HTTP upstream: a joulegate serving the GGUF in-process as tier ``backstage``."""
    return {
        "version": 1,
        "state_dir": state,
        "backends": {"q05": llamacpp_backend()},
        "tiers": [{"name": "backstage", "backend": "q05", "model": SMALL_MODEL_ID, "cost": 1.0}],
        "tenants": {"acme": tenant("acme", default_tier="backstage")},
    }


def matrix_policy(state: str, upstream_url: str) -> dict:
    """The gateway under test: tier ``small`` in-process, tier ``upstream`` over HTTP."""
    return {
        "version": 1,
        "state_dir": state,
        "backends": {
            "q05": llamacpp_backend(),
            "relay": {"kind": "openai", "base_url": f"{upstream_url}/v1", "api_key": KEYS["acme"],
                      "timeouts": {"first_byte_s": 300, "total_s": 600},
                      "energy": {"meter": "estimated", "joules_per_prompt_token": 0.1,
                                 "joules_per_output_token": 1.1}},
        },
        "tiers": [{"name": "small", "backend": "q05", "model": SMALL_MODEL_ID, "cost": 1.0},
                  {"name": "upstream", "backend": "relay", "model": "backstage", "cost": 1.0}],
        "tenants": {"acme": {"keys": ["sha256:" + key_digest(KEYS["acme"])],
                             "default_tier": "small"}},
    }


@pytest.fixture(scope="module")
def pair(tmp_path_factory, small_model_path):
    """The gateway under test and its HTTP upstream (both real processes)."""
    up_dir, gw_dir = tmp_path_factory.mktemp("upstream"), tmp_path_factory.mktemp("matrix")
    up = Gateway(upstream_policy(str(up_dir / "state")), up_dir)
    main = Gateway(matrix_policy(str(gw_dir / "state"), up.url), gw_dir)
    try:
        up.start()
        main.start()
        yield main, up
    finally:
        main.stop()
        up.stop()


@pytest.fixture
def gw(pair):
    return pair[0]


def quiet_counts(main: Gateway, up: Gateway) -> tuple[int, int]:
    """Both access logs' record counts once neither has grown for a second: a response's
    record is written when it ends, which a client may not wait for (a stream's tail)."""
    last: list[tuple[int, int]] = []

    def unchanged():
        last.append((len(access_records(main.log())), len(access_records(up.log()))))
        return len(last) > 10 and last[-11] == last[-1]

    wait_until(unchanged, 30, 0.1, "quiet access logs")
    return last[-1]


@pytest.fixture(autouse=True)
def served_on_the_pinned_tier(request, pair):
    """Every request a test made ran on the tier it pinned, and only ``upstream`` requests
    reached the upstream: a client test cannot pass on the other tier by accident."""
    main, up = pair
    tier = request.node.callspec.params["tier"]
    before = quiet_counts(main, up)
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:  # the test itself failed: that is the report
        return
    quiet_counts(main, up)
    records = access_records(main.log())[before[0]:]
    assert records and {r["tier"] for r in records} == {tier}, records
    relayed = access_records(up.log())[before[1]:]
    assert (len(relayed) == len(records)) if tier == "upstream" else not relayed, relayed


def base_url(gw: Gateway) -> str:
    return f"{gw.url}/v1"


def check_weather_args(arguments: str | dict) -> dict:
    """The call's arguments: JSON (or, from LangChain, the parsed dict) valid for the tool."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, WEATHER_PARAMS)
    assert args["city"].strip()
    return args


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return RESULT


# -- the official openai SDK --------------------------------------------------------------


@tiers
def test_openai_tool_round_trip(gw, tier):
    """A forced call, then the client sends the tool's result and the model answers with it."""
    client = gw.client()
    first = client.chat.completions.create(model=tier, messages=ASK, tools=[WEATHER],
                                           tool_choice="required", max_tokens=60, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    check_weather_args(call.function.arguments)

    # the returned message itself goes back, as OpenAI's guide does it
    history = [*ASK, choice.message, {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    final = client.chat.completions.create(model=tier, messages=history, tools=[WEATHER],
                                           max_tokens=40, temperature=0)
    answer = final.choices[0]
    assert not answer.message.tool_calls
    assert answer.finish_reason in ("stop", "length")
    assert "23" in answer.message.content  # the tool's result reached the model


@tiers
def test_openai_streamed_tool_call(gw, tier):
    """Tool-call deltas reassemble, the OpenAI way (by index), into one valid call."""
    chunks = list(gw.client().chat.completions.create(
        model=tier, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or part.id
            if part.function:
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    assert finishes == ["tool_calls"]
    [call] = calls.values()
    assert call["id"] and call["name"] == "get_weather"
    check_weather_args(call["arguments"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


@tiers
def test_openai_parse_structured_output(gw, tier):
    """``chat.completions.parse`` sends a strict ``json_schema`` format and parses the answer."""
    parsed = gw.client().chat.completions.parse(model=tier, messages=CITY_PROMPT,
                                                response_format=City, max_tokens=60,
                                                temperature=0)
    message = parsed.choices[0].message
    assert isinstance(message.parsed, City)
    assert message.parsed.name.strip() and message.parsed.country.strip()
    assert City.model_validate_json(message.content) == message.parsed


@tiers
def test_structured_output_cut_by_max_tokens_is_the_sdks_length_error(pair, tier):
    """A JSON answer cut off by ``max_tokens`` comes back as OpenAI sends it: 200, the JSON so
    far, ``finish_reason`` "length"; ``parse`` raises ``LengthFinishReasonError``. The SDK
    at its default of 2 retries sends it once: a 5xx here was retried, three times the
    joules for the same cut answer."""
    import openai

    main, up = pair
    before = quiet_counts(main, up)
    client = openai.OpenAI(base_url=base_url(main), api_key=KEYS["acme"], timeout=120)
    assert client.max_retries == 2
    with pytest.raises(openai.LengthFinishReasonError) as cut:
        client.chat.completions.parse(model=tier, messages=CITY_PROMPT, response_format=City,
                                      max_tokens=5, temperature=0)
    choice = cut.value.completion.choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    assert cut.value.completion.usage.completion_tokens == 5
    records = access_records(main.log())[before[0]:quiet_counts(main, up)[0]]
    assert [r["status"] for r in records] == [200], records


@tiers
def test_openai_responses_function_tool(gw, tier):
    """``responses.create`` with a function tool: a ``function_call`` item; its output sent
    back as a ``function_call_output`` item; the answer streamed as Responses events."""
    client = gw.client()
    tool = {"type": "function", "name": "get_weather",
            "description": "Get the current weather in a city", "parameters": WEATHER_PARAMS,
            "strict": True}
    first = client.responses.create(model=tier, input=ASK[0]["content"], tools=[tool],
                                    tool_choice="required", max_output_tokens=60, temperature=0)
    assert first.status == "completed"
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    check_weather_args(call.arguments)

    followup = [{"role": "user", "content": ASK[0]["content"]},
                {"type": "function_call", "call_id": call.call_id, "name": call.name,
                 "arguments": call.arguments},
                {"type": "function_call_output", "call_id": call.call_id, "output": RESULT}]
    events = list(client.responses.create(model=tier, input=followup, tools=[tool],
                                          max_output_tokens=40, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed",
                                                             "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas and final.output_text == deltas
    assert not [item for item in final.output if item.type == "function_call"]
    assert "23" in final.output_text
    assert final.usage.output_tokens > 0


# -- langchain-openai ----------------------------------------------------------------------


def chat_model(gw: Gateway, tier: str, **extra):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=tier, base_url=base_url(gw), api_key=KEYS["acme"], max_retries=0,
                      temperature=0, timeout=300, **extra)


@tiers
def test_langchain_bind_tools(gw, tier):
    """``bind_tools(tool_choice="any")`` → ``AIMessage.tool_calls``, whole and streamed; then
    a ``ToolMessage`` round trip."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    weather = tool(get_weather)
    llm = chat_model(gw, tier, max_tokens=60)
    forced = llm.bind_tools([weather], tool_choice="any")
    ask = [HumanMessage(ASK[0]["content"])]
    message = forced.invoke(ask)
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and call["id"]
    check_weather_args(call["args"])
    assert not message.invalid_tool_calls

    streamed = None
    for chunk in forced.stream(ask):
        streamed = chunk if streamed is None else streamed + chunk
    [scall] = streamed.tool_calls
    assert scall["name"] == "get_weather"
    check_weather_args(scall["args"])

    answer = llm.bind_tools([weather]).invoke(
        [*ask, message, ToolMessage(RESULT, tool_call_id=call["id"])])
    assert not answer.tool_calls and "23" in answer.content


@tiers
def test_langchain_legacy_functions(gw, tier):
    """``bind(functions=..., function_call=...)`` into ``JsonOutputFunctionsParser``: the
    legacy function-calling API that older chains still send."""
    from langchain_core.output_parsers.openai_functions import JsonOutputFunctionsParser
    from langchain_core.utils.function_calling import convert_to_openai_function

    fn = convert_to_openai_function(get_weather)
    chain = chat_model(gw, tier, max_tokens=60).bind(
        functions=[fn], function_call={"name": fn["name"]}) | JsonOutputFunctionsParser()
    check_weather_args(chain.invoke(ASK[0]["content"]))


@tiers
def test_langchain_structured_output(gw, tier):
    """``with_structured_output(method="json_schema")`` returns a model instance."""
    llm = chat_model(gw, tier, max_tokens=60).with_structured_output(City, method="json_schema")
    city = llm.invoke(CITY_PROMPT[0]["content"])
    assert isinstance(city, City) and city.name.strip() and city.country.strip()


@tiers
def test_langchain_responses_api(gw, tier):
    """``ChatOpenAI(use_responses_api=True)``: a tool call, and a streamed text answer."""
    from langchain_core.tools import tool

    llm = chat_model(gw, tier, max_tokens=60, use_responses_api=True)
    message = llm.bind_tools([tool(get_weather)], tool_choice="any").invoke(ASK[0]["content"])
    [call] = message.tool_calls
    assert call["name"] == "get_weather"
    check_weather_args(call["args"])

    streamed = None
    for chunk in llm.stream("Say hello."):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.text.strip()
    assert streamed.usage_metadata["output_tokens"] > 0


# -- openai-agents -------------------------------------------------------------------------


def run_agent(gw: Gateway, tier: str, which: str) -> None:
    """One agent with a function tool, run whole and streamed; the tool must be called with
    valid arguments and the run must finish with an answer."""
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    seen: list[str] = []

    @function_tool
    def weather(city: str) -> str:
        """Get the current weather in a city."""
        seen.append(city)
        return RESULT

    async def main():
        client = AsyncOpenAI(base_url=base_url(gw), api_key=KEYS["acme"], max_retries=0,
                             timeout=300)
        model_class = OpenAIResponsesModel if which == "responses" else OpenAIChatCompletionsModel
        # tool_choice="required" for the first turn; the SDK resets it after the call
        # (Agent.reset_tool_choice), so the second turn answers in text.
        agent = Agent(name="forecaster", instructions="Answer weather questions with the tool.",
                      tools=[weather], model=model_class(model=tier, openai_client=client),
                      model_settings=ModelSettings(tool_choice="required", max_tokens=60,
                                                   temperature=0))
        whole = await Runner.run(agent, ASK[0]["content"], max_turns=3)
        streamed = Runner.run_streamed(agent, ASK[0]["content"], max_turns=3)
        events = [event async for event in streamed.stream_events()]
        await client.close()
        return whole, streamed, events

    whole, streamed, events = asyncio.run(main())
    assert len(seen) == 2 and all(city.strip() for city in seen)  # once per run
    for result in (whole, streamed):
        kinds = [item.type for item in result.new_items]
        assert kinds[:2] == ["tool_call_item", "tool_call_output_item"]
        assert kinds[-1] == "message_output_item"
        assert isinstance(result.final_output, str) and result.final_output.strip()
    assert streamed.is_complete
    assert any(e.type == "raw_response_event" for e in events)  # token events, not one blob


@tiers
def test_agents_responses_model(gw, tier):
    """The Agents SDK's default model, ``OpenAIResponsesModel``, on ``POST /v1/responses``."""
    run_agent(gw, tier, "responses")


@tiers
def test_agents_chat_completions_model(gw, tier):
    """``OpenAIChatCompletionsModel`` on ``POST /v1/chat/completions``."""
    run_agent(gw, tier, "chat")


# -- the litellm SDK -----------------------------------------------------------------------


def litellm_call(gw: Gateway, tier: str, messages: list, **fields):
    import litellm

    return litellm.completion(model=f"openai/{tier}", api_base=base_url(gw),
                              api_key=KEYS["acme"], messages=messages, tools=[WEATHER],
                              temperature=0, num_retries=0, timeout=300, **fields)


@tiers
def test_too_long_a_prompt_is_litellms_context_window_error(gw, tier):
    """A prompt over the tier's context window (in-process: llama.cpp's; over HTTP: the
    upstream's 400, relayed) is OpenAI's ``context_length_exceeded``: LiteLLM raises its
    ``ContextWindowExceededError``, on which its ``context_window_fallbacks`` act, and the
    openai SDK a ``BadRequestError`` with that code."""
    import litellm
    import openai

    long = [{"role": "user", "content": "7" * 5000}]  # Qwen: one token per digit
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model=f"openai/{tier}", api_base=base_url(gw), api_key=KEYS["acme"],
                           messages=long, max_tokens=4, num_retries=0, timeout=300)
    client = openai.OpenAI(base_url=base_url(gw), api_key=KEYS["acme"], max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=tier, messages=long, max_tokens=4)
    assert refused.value.code == "context_length_exceeded"
    assert refused.value.param == "messages"


@tiers
def test_fill_in_the_middle_from_the_sdk_and_litellm(gw, tier):
    """A code editor's request: ``suffix`` with the prompt (the legacy completions API). The
    in-process tier fills the gap with the model's FIM tokens; the HTTP tier forwards the
    suffix and its upstream does. openai's ``completions.create`` and LiteLLM's
    ``text_completion`` both send it."""
    import litellm
    import openai

    ask = {"prompt": "def add(a, b):\n    return ", "suffix": "\n\n\nprint(add(1, 2))\n",
           "max_tokens": 8, "temperature": 0}
    client = openai.OpenAI(base_url=base_url(gw), api_key=KEYS["acme"], max_retries=0)
    plain = client.completions.create(model=tier, **{**ask, "suffix": None})
    reply = client.completions.create(model=tier, **ask)
    assert reply.choices[0].text.startswith("a + b"), reply.choices[0].text
    # The suffix reached the model: its tokens and the three FIM tokens were read.
    assert reply.usage.prompt_tokens >= plain.usage.prompt_tokens + 3 + 5
    relayed = litellm.text_completion(model=f"text-completion-openai/{tier}",
                                      api_base=base_url(gw), api_key=KEYS["acme"], **ask)
    assert relayed.choices[0].text == reply.choices[0].text
    assert relayed.usage.prompt_tokens == reply.usage.prompt_tokens


@tiers
def test_litellm_tools(gw, tier):
    """``litellm.completion(model="openai/<tier>")`` with ``tool_choice="required"``: the
    call, whole and streamed (reassembled by ``litellm.stream_chunk_builder``)."""
    import litellm

    whole = litellm_call(gw, tier, ASK, tool_choice="required", max_tokens=60)
    assert whole.choices[0].finish_reason == "tool_calls"
    [call] = whole.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id
    check_weather_args(call.function.arguments)

    chunks = list(litellm_call(gw, tier, ASK, tool_choice="required", max_tokens=60,
                               stream=True))
    assert len(chunks) > 2  # streamed, not one blob
    rebuilt = litellm.stream_chunk_builder(chunks, messages=ASK)
    assert rebuilt.choices[0].finish_reason == "tool_calls"
    [scall] = rebuilt.choices[0].message.tool_calls
    assert scall.function.name == "get_weather" and scall.id
    check_weather_args(scall.function.arguments)


@tiers
def test_litellm_tool_round_trip(gw, tier):
    """The tool's result sent back the way LiteLLM's function-calling guide does it: the
    returned ``Message`` itself, then a ``tool`` message; the model answers with the result."""
    first = litellm_call(gw, tier, ASK, tool_choice="required", max_tokens=60)
    message = first.choices[0].message
    [call] = message.tool_calls
    history = [*ASK, message, {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    final = litellm_call(gw, tier, history, max_tokens=40)
    assert not final.choices[0].message.tool_calls
    assert "23" in final.choices[0].message.content

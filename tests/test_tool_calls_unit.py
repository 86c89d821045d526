"""Tools, structured output and logprobs without a model: the Hermes parser, the stream
state machine, schema grammars, request plans and the HTTP pass-through's wire shapes."""

from __future__ import annotations

import json

import pytest

from backends.base import (
    BackendInvalidOutput,
    BackendRejected,
    Chunk,
    FeatureUnsupported,
    GenerationRequest,
)
from backends.features import (
    NamedToolChoice,
    ResponseFormat,
    TokenLogprob,
    ToolCallDelta,
    ToolSpec,
    logprobs_from_openai,
    tool_choice_from_openai,
)
from backends.llamacpp_features import (
    StreamShaper,
    insertion_prompt,
    plan_request,
    shape_answer,
)
from backends.openai_features import (
    WireFormatError,
    completion_extras,
    event_extras,
    merge_deltas,
    request_fields,
)
from backends.structured import GrammarError, build_grammar, schema_errors
from backends.tool_calls import HermesStreamParser, ToolCallError, hermes_messages, parse_hermes

pytestmark = pytest.mark.unit

WEATHER = ToolSpec("get_weather", "Weather in a city",
                   {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"]})
TIME = ToolSpec("get_time", None, {"type": "object", "properties": {"tz": {"type": "string"}}})
TOOLS = [WEATHER, TIME]


def block(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


# -- the Hermes parser ----------------------------------------------------------------------


def test_one_call_is_parsed_with_arguments_reserialised():
    out = parse_hermes(block("get_weather", '{ "city":"Paris" }'), TOOLS)
    assert out.content == ""
    [call] = out.calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_") and len(call.id) > 10


def test_content_before_calls_and_several_calls():
    text = "Let me look.\n" + block("get_weather", '{"city": "Oslo"}') + "\n" + \
        block("get_time", '{"tz": "CET"}') + "\n"
    out = parse_hermes(text, TOOLS)
    assert out.content == "Let me look."
    assert [c.name for c in out.calls] == ["get_weather", "get_time"]
    assert len({c.id for c in out.calls}) == 2
    assert [c.name for c in parse_hermes(text, TOOLS, parallel=False).calls] == ["get_weather"]


def test_text_without_calls_is_content():
    assert parse_hermes("Paris is sunny.", TOOLS).calls == []
    assert parse_hermes("Paris is sunny.", TOOLS).content == "Paris is sunny."


def test_unclosed_last_call_counts_when_its_json_is_complete():
    out = parse_hermes('<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}', TOOLS)
    assert [c.name for c in out.calls] == ["get_time"]


@pytest.mark.parametrize(("text", "message"), [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa</tool_call>', "not valid JSON"),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', "incomplete"),
    (block("launch_rockets", "{}"), "not among the offered tools"),
    (block("get_weather", '"Paris"'), "not a JSON object"),
    ('<tool_call>\n["get_weather"]\n</tool_call>', "with a 'name'"),
])
def test_malformed_calls_are_errors_not_half_calls(text, message):
    with pytest.raises(ToolCallError, match=message):
        parse_hermes(text, TOOLS)


def test_strict_tools_check_arguments_against_the_schema():
    strict = ToolSpec("get_weather", None, WEATHER.parameters, strict=True)
    with pytest.raises(ToolCallError, match="city"):
        parse_hermes(block("get_weather", '{"town": "Paris"}'), [strict])
    parse_hermes(block("get_weather", '{"town": "Paris"}'), [WEATHER])  # not strict: returned


def test_untagged_and_fenced_calls_of_small_models():
    bare = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
    assert parse_hermes(bare, TOOLS).calls[0].name == "get_weather"
    fenced = f"```json\n{bare}\n```"
    assert json.loads(parse_hermes(fenced, TOOLS).calls[0].arguments) == {"city": "Rome"}
    # JSON that is not a call of an offered tool stays text
    assert parse_hermes('{"city": "Rome"}', TOOLS).calls == []


def test_history_is_written_as_hermes_text_for_templates_without_tools():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": "23C"}]
    out = hermes_messages(messages, TOOLS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.") and '"get_time"' in out[0]["content"]
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in out[2]["content"]
    assert out[3]["content"].count("<tool_response>") == 2


# -- the stream state machine ---------------------------------------------------------------


def feed_all(parser, pieces):
    text, calls = "", []
    for piece in pieces:
        out = parser.feed(piece)
        text, calls = text + out.text, calls + out.calls
    out = parser.finish()
    return text + out.text, calls + out.calls


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_stream_parser_matches_the_whole_text_parser(size):
    text = "Checking.\n\n" + block("get_weather", '{"city": "Oslo"}') + "\n" + \
        block("get_time", '{"tz": "CET"}')
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    streamed, calls = feed_all(HermesStreamParser(TOOLS), pieces)
    whole = parse_hermes(text, TOOLS)
    assert streamed == whole.content == "Checking."
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole.calls]


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
@pytest.mark.parametrize("text", ["\nChecking.\n", "  Checking. ", "\n\n", ""])
def test_streamed_and_whole_content_before_a_call_are_the_same(text, size):
    """The text's beginning goes out before a call could be seen: the whole answer keeps it
    too (it stripped it, so a streamed answer's content began with a newline the whole one
    had not); whitespace right before the call goes in both."""
    answer = text + block("get_time", '{"tz": "CET"}')
    pieces = [answer[i:i + size] for i in range(0, len(answer), size)]
    streamed, calls = feed_all(HermesStreamParser(TOOLS), pieces)
    whole = parse_hermes(answer, TOOLS)
    assert streamed == whole.content == text.rstrip()
    assert [c.name for c in calls] == [c.name for c in whole.calls] == ["get_time"]


def test_stream_parser_lets_plain_text_out_early():
    parser = HermesStreamParser(TOOLS)
    assert parser.feed("a < b").text == "a < b"
    assert parser.feed(" and <tool").text == " and"  # a possible tag (and its space) is held
    assert parser.feed("box>").text == " <toolbox>"
    assert parser.finish().text == ""


def test_stream_parser_holds_a_call_until_it_is_whole():
    parser = HermesStreamParser(TOOLS)
    assert parser.feed('<tool_call>\n{"name": "get_weather", ').calls == []
    assert parser.feed('"arguments": {"city": "X"}}\n').calls == []
    assert [c.name for c in parser.feed("</tool_call>").calls] == ["get_weather"]


def test_stream_parser_raises_on_a_broken_or_unfinished_call():
    parser = HermesStreamParser(TOOLS)
    parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    with pytest.raises(ToolCallError, match="incomplete"):
        parser.finish()
    parser = HermesStreamParser(TOOLS)
    with pytest.raises(ToolCallError, match="not among the offered"):
        parser.feed(block("nope", "{}"))


def test_stream_parser_reads_a_fenced_untagged_call_at_the_end():
    text = '```json\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n```'
    streamed, calls = feed_all(HermesStreamParser(TOOLS), list(text))
    assert streamed == "" and [c.name for c in calls] == ["get_time"]
    code = "```python\nprint(1)\n```"
    assert feed_all(HermesStreamParser(TOOLS), list(code)) == (code, [])


def _plan(**fields):
    return plan_request(GenerationRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                          **fields), template_renders_tools=True)


def _reassemble(chunks: list[Chunk]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for d in chunk.tool_calls or ():
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += d.id or ""
            call["name"] += d.name or ""
            call["arguments"] += d.arguments
    return calls


def test_stream_shaper_sends_name_first_then_arguments_and_finishes_with_tool_calls():
    shaper = StreamShaper(_plan(tools=TOOLS, tool_choice="required"))
    text = block("get_weather", '{"city": "Lima"}')
    chunks = [c for ch in text for c in shaper.feed(ch)]
    rest, finish = shaper.finish("stop")
    chunks += rest
    assert finish == "tool_calls"
    first = chunks[0].tool_calls[0]
    assert first.index == 0 and first.id.startswith("call_") and first.name == "get_weather"
    assert first.arguments == ""
    assert _reassemble(chunks)[0]["name"] == "get_weather"
    assert json.loads(_reassemble(chunks)[0]["arguments"]) == {"city": "Lima"}
    assert not any(c.text for c in chunks)


def test_stream_shaper_errors_when_a_required_call_never_came():
    shaper = StreamShaper(_plan(tools=TOOLS, tool_choice="required"))
    shaper.feed("Sure.")
    with pytest.raises(BackendInvalidOutput, match=r"no tool call"):
        shaper.finish("stop")


def test_stream_shaper_ends_an_answer_cut_by_max_tokens_with_length():
    # Cut before the call: no error (the client asked for that few tokens), finish "length".
    shaper = StreamShaper(_plan(tools=TOOLS, tool_choice="required"))
    shaper.feed("<tool_")
    assert shaper.finish("length") == ([], "length")
    # Cut inside it: the call as far as it got, still "length" (not "tool_calls").
    shaper = StreamShaper(_plan(tools=TOOLS))
    assert shaper.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci') == []
    chunks, finish = shaper.finish("length")
    assert finish == "length"
    assert [(d.name, d.arguments) for c in chunks for d in c.tool_calls or []] == [
        ("get_weather", ""), (None, '{"ci')]
    # JSON cut short goes out as it is.
    shaper = StreamShaper(_plan(response_format=ResponseFormat("json_object")))
    assert [c.text for c in shaper.feed('{"a": ')] == ['{"a": ']
    assert shaper.finish("length") == ([], "length")


def test_stream_shaper_checks_json_at_the_end_and_carries_logprobs():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    lp = TokenLogprob("{", -0.1, [123])
    shaper = StreamShaper(_plan(response_format=ResponseFormat("json_schema", "x", schema, True)))
    [chunk] = shaper.feed('{"n": "one"}', [lp])
    assert chunk.text == '{"n": "one"}' and chunk.logprobs == [lp]
    with pytest.raises(BackendInvalidOutput, match=r"\$\.n: 'one' is not of type 'integer'"):
        shaper.finish("stop")


def test_shape_answer_checks_json_formats():
    plan = _plan(response_format=ResponseFormat("json_object"))
    assert shape_answer(plan, '{"a": 1}', "stop") == ('{"a": 1}', None, "stop")
    with pytest.raises(BackendInvalidOutput, match=r"not valid JSON"):
        shape_answer(plan, '{"a": ', "stop")
    # Cut off by max_tokens: returned as it is, as OpenAI does (finish_reason "length").
    assert shape_answer(plan, '{"a": ', "length") == ('{"a": ', None, "length")
    schema = ResponseFormat("json_schema", "x", {"type": "object", "required": ["b"]}, True)
    assert shape_answer(_plan(response_format=schema), '{"a": 1', "length")[2] == "length"
    tools = _plan(tools=TOOLS, tool_choice="required")
    content, calls, finish = shape_answer(tools, 'x <tool_call>\n{"name": "get_time", "ar',
                                          "length")
    assert (content, finish) == ("x", "length")
    assert calls is not None and [(c.name, c.arguments) for c in calls] == [("get_time", "")]
    assert shape_answer(tools, "<tool_", "length") == ("", None, "length")
    with pytest.raises(BackendInvalidOutput, match="not an object"):
        shape_answer(plan, "[1]", "stop")


# -- plans and grammars ---------------------------------------------------------------------


def test_plans_reject_impossible_tool_choices():
    with pytest.raises(BackendRejected, match="no tools") as info:
        _plan(tool_choice="required")
    assert info.value.param == "tool_choice"
    with pytest.raises(BackendRejected, match="'get_date'"):
        _plan(tools=TOOLS, tool_choice=NamedToolChoice("get_date"))
    with pytest.raises(BackendRejected, match="chat") as info:
        plan_request(GenerationRequest(model="m", prompt="x", tools=TOOLS),
                     template_renders_tools=True)
    assert info.value.param == "tools"
    bad = ResponseFormat("json_schema", "x", {"type": "no-such-type"})
    with pytest.raises(BackendRejected, match="not a valid JSON schema") as info:
        _plan(response_format=bad)
    assert info.value.param == "response_format"


def test_fill_in_the_middle_needs_the_models_fim_tokens():
    """A ``suffix`` is served only by a model that has fill-in-the-middle tokens (Qwen2.5-
    Coder's ids below); its prompt is prefix, suffix, then the middle token."""
    qwen = (151659, 151661, 151660)
    filled = GenerationRequest(model="m", prompt="def f():", suffix="\nf()")
    assert plan_request(filled, template_renders_tools=True, fim=qwen).messages is None
    for none in [(-1, -1, -1), (151659, -1, 151660)]:
        with pytest.raises(FeatureUnsupported, match="fill-in-the-middle") as info:
            plan_request(filled, template_renders_tools=True, fim=none)
        assert info.value.param == "suffix"
    plain = GenerationRequest(model="m", prompt="def f():")
    assert plan_request(plain, template_renders_tools=True).messages is None
    assert insertion_prompt(qwen, [1, 2], [3]) == [151659, 1, 2, 151661, 3, 151660]
    assert insertion_prompt(qwen, [], [], bos=7) == [7, 151659, 151661, 151660]


def test_plans_for_each_tool_choice():
    auto = _plan(tools=TOOLS)
    assert auto.grammar is None and auto.tools == TOOLS and len(auto.template_tools) == 2
    none = _plan(tools=TOOLS, tool_choice="none")
    assert none.tools is None and none.template_tools is None and none.grammar is None
    named = _plan(tools=TOOLS, tool_choice=NamedToolChoice("get_time"), parallel_tool_calls=False)
    assert named.force_call and named.tools == [TIME] and len(named.template_tools) == 2
    assert '"\\"get_time\\""' in named.grammar and "get_weather" not in named.grammar
    assert _plan(logprobs=True, top_logprobs=50).top_logprobs == 20
    assert _plan(top_logprobs=5).top_logprobs is None


def test_grammars():
    assert build_grammar() is None and build_grammar(tools=TOOLS) is None
    forced = build_grammar(tools=TOOLS, force_call=True)
    assert 'root ::= ( "<tool_call>\\n" ( call0 | call1 ) "\\n</tool_call>" ( "\\n"' in forced
    single = build_grammar(tools=TOOLS, force_call=True, parallel=False)
    assert single.strip().endswith('"\\n</tool_call>" )')
    both = build_grammar(tools=TOOLS, response=ResponseFormat("json_object"))
    assert "| ( response )" in both  # auto + JSON: a call or the JSON answer
    schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}},
              "$defs": {"x": {"type": "integer"}}}
    assert "root ::= ( response )" in build_grammar(
        response=ResponseFormat("json_schema", "s", schema))
    with pytest.raises(GrammarError, match="tool 'get_weather'"):
        build_grammar(tools=[ToolSpec("get_weather", None, {"type": 5})], force_call=True)


def test_schema_errors_say_where():
    schema = {"type": "object", "properties": {"items": {"type": "array",
                                                         "items": {"type": "integer"}}}}
    assert schema_errors(schema, {"items": [1, 2]}) is None
    assert schema_errors(schema, {"items": [1, "x"]}) == "$.items[1]: 'x' is not of type 'integer'"


# -- wire shapes ----------------------------------------------------------------------------


def test_openai_shapes_round_trip():
    tool = {"type": "function", "function": {"name": "f", "description": "d",
                                             "parameters": {"type": "object"}, "strict": True}}
    assert ToolSpec.from_openai(tool).to_openai() == tool
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"},
                                                  "strict": True}}
    assert ResponseFormat.from_openai(fmt).to_openai() == fmt
    assert tool_choice_from_openai({"type": "function", "function": {"name": "f"}}) == \
        NamedToolChoice("f")
    with pytest.raises(ValueError, match="tool_choice"):
        tool_choice_from_openai("always")
    assert ToolCallDelta(0, "call_1", "f").to_openai() == {
        "index": 0, "id": "call_1", "type": "function", "function": {"arguments": "", "name": "f"}}


def test_http_pass_through_fields():
    req = GenerationRequest(model="m", messages=[], tools=[WEATHER], tool_choice="required",
                            parallel_tool_calls=False, response_format=ResponseFormat("json_object"),
                            logprobs=True, top_logprobs=2)
    assert request_fields(req) == {
        "tools": [WEATHER.to_openai()], "tool_choice": "required", "parallel_tool_calls": False,
        "response_format": {"type": "json_object"}, "logprobs": True, "top_logprobs": 2}
    assert request_fields(GenerationRequest(model="m", prompt="x", logprobs=True)) == {"logprobs": 0}
    assert request_fields(GenerationRequest(model="m", messages=[])) == {}


def test_http_answers_are_parsed_and_checked():
    raw = json.dumps({"choices": [{"message": {"content": None, "tool_calls": [
        {"id": "call_9", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        "logprobs": {"content": [{"token": "a", "logprob": -1.0, "bytes": [97],
                                  "top_logprobs": [{"token": "a", "logprob": -1.0}]}]}}]}).encode()
    calls, logprobs = completion_extras(raw, chat=True)
    assert calls[0].id == "call_9" and calls[0].arguments == '{"city": "Oslo"}'
    assert logprobs[0].token == "a" and logprobs[0].top_logprobs[0].logprob == -1.0
    bad = raw.replace(b'{\\"city\\": \\"Oslo\\"}', b"{oops")
    with pytest.raises(WireFormatError, match="not JSON"):
        completion_extras(bad, chat=True)
    event = json.dumps({"choices": [{"delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": '{"ci'}}]}}]}).encode()
    assert event_extras(event, chat=True) == ([ToolCallDelta(0, arguments='{"ci')], [])
    with pytest.raises(WireFormatError, match="index"):
        event_extras(event.replace(b'"index": 0', b'"index": "0"'), chat=True)
    merged = merge_deltas([ToolCallDelta(0, "c", "f", ""), ToolCallDelta(0, arguments="{"),
                           ToolCallDelta(0, arguments="}"), ToolCallDelta(1, "d", "g", "")])
    assert merged == [ToolCallDelta(0, "c", "f", "{}"), ToolCallDelta(1, "d", "g", "")]


def test_legacy_completion_logprobs():
    entries = logprobs_from_openai({"tokens": ["a", "b"], "token_logprobs": [-0.5, -1.5],
                                    "top_logprobs": [{"a": -0.5, "c": -2.0}, None]})
    assert [(e.token, e.logprob) for e in entries] == [("a", -0.5), ("b", -1.5)]
    assert [t.token for t in entries[0].top_logprobs] == ["a", "c"]


@pytest.mark.parametrize(("text", "name", "arguments"), [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', "get_weather",
     '{"city": "Pa'),
    ('<tool_call>\n{"name": "get_weather", "arguments": ', "get_weather", ""),
    ('<tool_call>\n{"name": "get_weather"', "get_weather", ""),
    ('<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}', "get_time", '{"tz": "UTC"}'),
])
def test_a_call_cut_off_by_max_tokens_comes_back_as_far_as_it_got(text, name, arguments):
    # OpenAI's answer to a call cut off by max_tokens: the name and the arguments text so
    # far, finish_reason "length" (the backend sets that); never an error.
    (call,) = parse_hermes("Let me look.\n" + text, TOOLS, cut=True).calls
    assert (call.name, call.arguments) == (name, arguments)
    assert parse_hermes(text, TOOLS, cut=True).content == ""
    parser = HermesStreamParser(TOOLS)
    assert parser.feed(text).calls == []
    (streamed,) = parser.finish(cut=True).calls
    assert (streamed.name, streamed.arguments) == (name, arguments)


def test_a_cut_call_without_an_offered_name_is_dropped_and_earlier_calls_kept():
    text = block("get_time", '{"tz": "UTC"}') + '\n<tool_call>\n{"na'
    out = parse_hermes(text, TOOLS, cut=True)
    assert [c.name for c in out.calls] == ["get_time"]
    assert parse_hermes('<tool_call>\n{"name": "launch_rock', TOOLS, cut=True).calls == []
    parser = HermesStreamParser(TOOLS)
    parser.feed('<tool_call>\n{"name": "launch_rockets", "arguments": {')
    assert parser.finish(cut=True).calls == []
    # A finished block that is broken is still an error, cut or not.
    with pytest.raises(ToolCallError, match="not among the offered"):
        parse_hermes(block("launch_rockets", "{}") + "\n<tool_call>\n{", TOOLS, cut=True)

"""Request validation: every mistake is a 400 in the OpenAI error shape naming the field."""

from __future__ import annotations

import orjson
import pytest

from backends.base import Chunk
from backends.features import TokenLogprob, ToolCall, ToolCallDelta
from gateway.errors import APIError
from gateway.openai_types import (
    ChatCompletionRequest,
    CompletionRequest,
    TextLogprobs,
    answer_logprobs,
    parse_request,
    spelled,
)

pytestmark = pytest.mark.unit

MSGS = [{"role": "user", "content": "hi"}]


def error_of(body, cls=ChatCompletionRequest) -> dict:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    with pytest.raises(APIError) as info:
        parse_request(cls, raw)
    assert info.value.status == 400
    err = info.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    return err


@pytest.mark.parametrize("field,value,code", [
    ("frobnicate", 1, "unsupported_parameter"),
    ("web_search_options", {}, "unsupported_value"),
    ("prediction", {"type": "content", "content": "x"}, "unsupported_value"),
    ("audio", {"voice": "alloy", "format": "wav"}, "unsupported_value"),
])
def test_unknown_and_refused_fields_are_named(field, value, code):
    err = error_of({"model": "auto", "messages": MSGS, field: value})
    assert err["param"] == field and err["code"] == code
    assert f"'{field}'" in err["message"]


def test_n_greater_than_one():
    err = error_of({"model": "auto", "messages": MSGS, "n": 2})
    assert err["param"] == "n" and "n=1" in err["message"]
    assert parse_request(ChatCompletionRequest, orjson.dumps(
        {"model": "auto", "messages": MSGS, "n": 1})).n == 1


def test_image_part_names_its_message():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "look"},
                                         {"type": "image_url", "image_url": {"url": "x"}}]}]
    err = error_of({"model": "auto", "messages": msgs})
    assert err["param"] == "messages[0].content" and "image_url" in err["message"]


def test_types_and_ranges():
    assert error_of({"model": "auto", "messages": MSGS, "temperature": "hot"})["code"] == "invalid_type"
    assert error_of({"model": "auto", "messages": MSGS, "temperature": 2.5})["param"] == "temperature"
    assert error_of({"model": "auto", "messages": MSGS, "max_tokens": 0})["param"] == "max_tokens"
    assert error_of({"model": "auto", "messages": MSGS, "stream": "yes"})["code"] == "invalid_type"
    assert error_of({"model": "auto", "messages": MSGS, "stop": ["a"] * 5})["param"] == "stop"
    assert error_of({"model": "auto", "messages": []})["param"] == "messages"
    assert error_of({"model": "auto", "messages": [{"role": "wizard", "content": "x"}]})["param"] == \
        "messages[0].role"
    assert error_of({"model": "auto", "messages": [{"role": "function", "content": "x"}]})["param"] == \
        "messages[0].name"
    assert error_of({"model": "auto", "messages": [{"role": "tool", "content": "x"}]})["param"] == \
        "messages[0].tool_call_id"


def test_malformed_bodies():
    assert error_of(b"{not json")["code"] == "invalid_json"
    assert error_of(b"[1, 2]")["code"] == "invalid_json"
    assert error_of({"messages": MSGS})["code"] == "missing_required_parameter"


def test_stream_options_need_stream():
    err = error_of({"model": "auto", "messages": MSGS, "stream_options": {"include_usage": True}})
    assert err["param"] == "stream_options"


def test_conflicting_token_limits():
    err = error_of({"model": "a", "messages": MSGS, "max_tokens": 5, "max_completion_tokens": 6})
    assert err["param"] == "max_tokens"


def test_valid_chat_becomes_generation_request():
    req = parse_request(ChatCompletionRequest, orjson.dumps({
        "model": "auto", "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 3,
        "stop": "END", "user": "u1", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "developer", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                  {"type": "text", "text": "b"}]}]}))
    assert req.include_usage
    gen = req.to_generation("m", "rid")
    assert gen.messages == [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "a\nb"}]
    assert (gen.max_tokens, gen.temperature, gen.top_p, gen.seed, gen.stop, gen.user) == \
        (7, 0, 0.5, 3, ["END"], "u1")


def test_completion_request():
    req = parse_request(CompletionRequest, b'{"model": "auto", "prompt": "def f():"}')
    gen = req.to_generation("m", "r")
    assert gen.prompt == "def f():" and gen.max_tokens == 16 and not gen.is_chat
    assert error_of({"model": "a", "prompt": ["x", "y"]}, CompletionRequest)["param"] == "prompt"
    assert error_of({"model": "a", "prompt": "x", "echo": True}, CompletionRequest)["param"] == "echo"


def _entries(*tokens: str | bytes) -> list[TokenLogprob]:
    return [TokenLogprob(t if isinstance(t, str) else t.decode("utf-8", "replace"), -1.0,
                         list(t.encode() if isinstance(t, str) else t)) for t in tokens]


def _tokens(entries) -> list[str]:
    return [e.token for e in entries]


def test_the_logprobs_of_text_before_a_tool_call_are_its_own_tokens():
    call = [ToolCall("c1", "f", "{}")]
    # llama.cpp's tokens: a stripped leading newline, the text, a last token part text and
    # part what was stripped, then the call's own
    raw = _entries("\n", "Let", " me", " check", ".\n", "<tool_call>", '{"name"')
    assert _tokens(answer_logprobs(raw, "Let me check.", call)) == [
        "Let", " me", " check", ".\n"]
    assert answer_logprobs(raw, "", call) == []  # a call alone has no text
    assert _tokens(spelled(_entries(" ", "Hi"), " Hi")) == [" ", "Hi"]  # its own whitespace
    # no call: as the backend gave them, even where their bytes do not add up to the text
    # (vLLM reports a token holding half of a character as U+FFFD)
    split = _entries(b"\xf0\x9f", b"\x98\x80", "!")
    assert answer_logprobs(split, "\U0001F600!", None) is split
    assert answer_logprobs(None, "x", call) is None

    stream = TextLogprobs()
    assert stream.take(Chunk(logprobs=_entries("\n"))) == []  # no text yet: it waits
    assert _tokens(stream.take(Chunk(text="Let", logprobs=_entries("Let")))) == ["\n", "Let"]
    assert _tokens(stream.take(Chunk(text=" me", logprobs=_entries(" me", "<tool_call>")))) == [
        " me", "<tool_call>"]  # a text chunk's entries are all its own
    assert stream.take(Chunk(logprobs=_entries('{"name"'))) == []
    assert stream.take(Chunk(tool_calls=[ToolCallDelta(0, "c1", "f")],
                             logprobs=_entries("}"))) == []  # the call's: dropped
    assert stream.pending == []

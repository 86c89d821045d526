"""Out-of-range numbers are 400s naming the field, and an upstream's answer is parsed into
checked shapes: garbage is :class:`Malformed`, never relayed or coerced (unit)."""

from __future__ import annotations

import orjson
import pytest

from backends.openai_http import Malformed, parse_completion, parse_event, parse_usage
from gateway import openai_types as wire
from gateway.errors import InvalidRequest

pytestmark = pytest.mark.unit

#: (field, its value as JSON text): the JSON is written by hand, for numbers beyond 64 bits.
OUT_OF_RANGE = [
    ("seed", str(1 << 63)), ("seed", str(-(1 << 63) - 1)), ("seed", "1" + "0" * 30),
    ("max_tokens", "0"), ("max_tokens", str(wire.MAX_TOKENS_CAP + 1)),
    ("max_tokens", "1" + "0" * 30),
    ("max_completion_tokens", "0"), ("max_completion_tokens", str(wire.MAX_TOKENS_CAP + 1)),
    ("temperature", "-0.1"), ("temperature", "2.5"), ("temperature", "1e400"),
    ("top_p", "-0.1"), ("top_p", "1.5"), ("stop", '"' + "x" * (wire.MAX_STOP_CHARS + 1) + '"'),
    ("user", '"' + "u" * 257 + '"'), ("n", "2"),
]


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE,
                         ids=[f"{f}={v[:12]}" for f, v in OUT_OF_RANGE])
def test_an_out_of_range_number_is_a_400_naming_the_field(field: str, value: str) -> None:
    raw = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"' + field.encode() \
        + b'":' + value.encode() + b"}"
    with pytest.raises(InvalidRequest) as caught:
        wire.parse_request(wire.ChatCompletionRequest, raw)
    assert caught.value.status == 400 and caught.value.param == field
    assert caught.value.code in ("invalid_value", "unsupported_value")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_are_a_400_naming_the_field(literal: bytes) -> None:
    raw = b'{"model":"m","prompt":"hi","temperature":' + literal + b"}"
    with pytest.raises(InvalidRequest) as caught:
        wire.parse_request(wire.CompletionRequest, raw)
    assert caught.value.param == "temperature" and caught.value.code == "invalid_value"


def test_the_int64_edges_of_seed_are_accepted() -> None:
    for seed in (wire.SEED_MIN, wire.SEED_MAX):
        raw = orjson.dumps({"model": "m", "prompt": "hi", "seed": seed})
        assert wire.parse_request(wire.CompletionRequest, raw).seed == seed


def event(**fields: object) -> bytes:
    return orjson.dumps({"id": "x", "object": "chat.completion.chunk", **fields})


@pytest.mark.parametrize("payload", [
    b"123", b"[1,2]", b"not json", b'"text"',
    event(choices="nope"), event(choices=[1]), event(choices=[{"delta": "hi"}]),
    event(choices=[{"delta": {"content": 123}}]),
    event(choices=[{"delta": {"content": "a"}, "finish_reason": 7}]),
    event(choices=[], usage="14"), event(choices=[], usage={"prompt_tokens": "12"}),
    event(choices=[], usage={"completion_tokens": -1}),
    event(choices=[], usage={"completion_tokens": True}),
    event(choices=[], usage={"completion_tokens": 1 << 40}),
])
def test_a_malformed_chat_event_is_refused(payload: bytes) -> None:
    with pytest.raises(Malformed):
        parse_event(payload, chat=True)


def test_a_good_event_gives_its_texts_finish_and_usage() -> None:
    got = parse_event(event(choices=[{"delta": {"role": "assistant", "content": "Hi"}}]), True)
    assert (got.texts, got.finish, got.usage, got.error) == (["Hi"], None, None, False)
    got = parse_event(event(choices=[{"delta": {}, "finish_reason": "length"}],
                            usage={"prompt_tokens": 3, "completion_tokens": 4}), True)
    assert got.finish == "length" and got.usage is not None
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (3, 4)
    assert parse_event(orjson.dumps({"choices": [{"text": "t"}]}), False).texts == ["t"]
    assert parse_event(orjson.dumps({"error": {"message": "boom"}}), True).error


@pytest.mark.parametrize("body", [
    b"123", b"[1,2]", b"{}", orjson.dumps({"choices": []}),
    orjson.dumps({"choices": [{"message": {"content": 123}}]}),
    orjson.dumps({"choices": [{"message": {"content": "hi"}}], "usage": "14"}),
])
def test_a_malformed_completion_is_refused(body: bytes) -> None:
    with pytest.raises(Malformed):
        parse_completion(body, chat=True)


def test_a_good_completion_gives_text_finish_and_usage() -> None:
    body = orjson.dumps({"choices": [{"message": {"content": None}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": 0}})
    text, finish, usage = parse_completion(body, chat=True)
    assert (text, finish) == ("", "stop") and usage is not None and usage.prompt_tokens == 5
    assert parse_usage(None) is None

"""Tools, structured output and log-probabilities over an OpenAI-compatible HTTP upstream.

These are pass-through: the request's fields go to the upstream in OpenAI's spelling and
the upstream decides (a server without tool support refuses or ignores them); what comes
back (``tool_calls``, ``logprobs``) is checked for type, like every field the gateway reads
(:mod:`backends.openai_http`), and turned into the same values the in-process backends
produce. The answers are parsed for these fields only when the request asked for them, so
a plain request pays nothing.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from .base import GenerationRequest
from .features import (
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    logprobs_from_openai,
    tool_choice_to_openai,
)


class WireFormatError(ValueError):
    """An upstream's ``tool_calls`` or ``logprobs`` has the wrong shape (safe to show)."""


def request_fields(req: GenerationRequest) -> dict[str, Any]:
    """The request's suffix, tool, format and log-probability fields, and its pass-through
    :attr:`~GenerationRequest.extra` fields, as OpenAI body fields."""
    body: dict[str, Any] = dict(req.extra)
    if req.suffix is not None:
        body["suffix"] = req.suffix
    if req.tools:
        body["tools"] = [t.to_openai() for t in req.tools]
    if req.tool_choice is not None:
        body["tool_choice"] = tool_choice_to_openai(req.tool_choice)
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    if req.response_format is not None:
        body["response_format"] = req.response_format.to_openai()
    if req.logprobs:
        if req.is_chat:
            body["logprobs"] = True
            if req.top_logprobs is not None:
                body["top_logprobs"] = req.top_logprobs
        else:  # the legacy completions API takes the number of alternatives
            body["logprobs"] = req.top_logprobs or 0
    return body


def wants_extras(req: GenerationRequest) -> bool:
    """Whether answers to ``req`` may carry tool calls or log-probabilities."""
    return bool(req.tools) or req.logprobs


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise WireFormatError(f"{what} is a {type(value).__name__}, not a string")
    return value


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireFormatError(f"{what} is a {type(value).__name__}, not an object")
    return value


def _logprobs(choice: dict[str, Any]) -> list[TokenLogprob] | None:
    try:
        return logprobs_from_openai(choice.get("logprobs"))
    except (ValueError, TypeError, KeyError, AttributeError):
        raise WireFormatError("logprobs has the wrong shape") from None


def parse_tool_calls(value: object) -> list[ToolCall] | None:
    """``message.tool_calls`` → calls; their arguments must be JSON text."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise WireFormatError("message.tool_calls is not a list")
    calls = []
    for i, item in enumerate(value):
        call = _dict(item, f"tool_calls[{i}]")
        fn = _dict(call.get("function"), f"tool_calls[{i}].function")
        args = _str(fn.get("arguments"), f"tool_calls[{i}].function.arguments")
        try:
            json.loads(args)
        except json.JSONDecodeError:
            raise WireFormatError(f"tool_calls[{i}].function.arguments is not JSON") from None
        calls.append(ToolCall(_str(call.get("id"), f"tool_calls[{i}].id"),
                              _str(fn.get("name"), f"tool_calls[{i}].function.name"), args))
    return calls or None


def parse_tool_call_deltas(value: object) -> list[ToolCallDelta]:
    """``delta.tool_calls`` → pieces."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise WireFormatError("delta.tool_calls is not a list")
    out = []
    for i, item in enumerate(value):
        piece = _dict(item, f"delta.tool_calls[{i}]")
        index = piece.get("index", 0)
        if type(index) is not int or index < 0:
            raise WireFormatError(f"delta.tool_calls[{i}].index is not a non-negative integer")
        fn = piece.get("function")
        fn = {} if fn is None else _dict(fn, f"delta.tool_calls[{i}].function")
        call_id, name, args = piece.get("id"), fn.get("name"), fn.get("arguments")
        out.append(ToolCallDelta(
            index,
            None if call_id is None else _str(call_id, f"delta.tool_calls[{i}].id"),
            None if name is None else _str(name, f"delta.tool_calls[{i}].function.name"),
            "" if args is None else _str(args, f"delta.tool_calls[{i}].function.arguments")))
    return out


def _choice(data: object) -> dict[str, Any] | None:
    if not isinstance(data, dict):
        raise WireFormatError("the answer is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    return _dict(choices[0], "a choice")


def completion_extras(raw: bytes, chat: bool
                      ) -> tuple[list[ToolCall] | None, list[TokenLogprob] | None]:
    """The tool calls and log-probabilities of a whole answer."""
    try:
        choice = _choice(orjson.loads(raw))
    except orjson.JSONDecodeError:
        raise WireFormatError("the completion is not JSON") from None
    if choice is None:
        return None, None
    calls = None
    if chat:
        message = choice.get("message")
        if isinstance(message, dict):
            calls = parse_tool_calls(message.get("tool_calls"))
    return calls, _logprobs(choice)


def event_extras(payload: bytes, chat: bool) -> tuple[list[ToolCallDelta], list[TokenLogprob]]:
    """The tool-call pieces and log-probabilities of one streamed event."""
    try:
        choice = _choice(orjson.loads(payload))
    except orjson.JSONDecodeError:
        raise WireFormatError("an event is not JSON") from None
    if choice is None:
        return [], []
    deltas: list[ToolCallDelta] = []
    if chat:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            deltas = parse_tool_call_deltas(delta.get("tool_calls"))
    return deltas, _logprobs(choice) or []


def merge_deltas(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Join consecutive argument pieces of the same call (events that arrived together)."""
    out: list[ToolCallDelta] = []
    for d in deltas:
        last = out[-1] if out else None
        if last is not None and last.index == d.index and d.id is None and d.name is None:
            out[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments + d.arguments)
        else:
            out.append(d)
    return out

"""Hermes-style tool calling for in-process models (Qwen2.5, Hermes, and kin).

The model sees its functions in the system prompt and answers a call as::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(several blocks for parallel calls, optionally after some text). The prompt side is the
model's own chat template when it renders ``tools`` (Qwen2.5's does); otherwise
:func:`hermes_messages` writes the same system prompt and history by hand.

Parsing follows vLLM's ``hermes`` tool parser: the text before the first ``<tool_call>`` is
the message content, each block's JSON is a call, an unclosed last block counts if its JSON
is complete. Unlike vLLM, a block that does not parse, a call of a function that was not
offered, or non-object arguments are an error (:class:`ToolCallError`), never dropped and
never half returned; and a whole answer that is just the call's JSON object without the
tags (small Qwen models do that) is read as that call. The one exception is an answer cut
off by ``max_tokens`` (``cut``): as OpenAI does, its last call comes back with the name and
the arguments as far as the model got (:func:`cut_call`), and the finish reason says
``length``.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .features import ToolCall, ToolSpec, new_call_id
from .structured import TOOL_CALL_END, TOOL_CALL_START, schema_errors


class ToolCallError(ValueError):
    """The model's output holds a tool call that cannot be returned; says why."""


# -- prompt ---------------------------------------------------------------------------------


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a chat template: an assistant's ``tool_calls[i].function.arguments`` as
    the JSON *object* it encodes (templates write it with ``tojson``, as vLLM passes it),
    and ``None`` contents as ``""``."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("content") is None:
            message["content"] = ""
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            converted = []
            for call in calls:
                call = dict(call)
                fn = dict(call.get("function") or {})
                args = fn.get("arguments")
                if isinstance(args, str):
                    with contextlib.suppress(json.JSONDecodeError):
                        fn["arguments"] = json.loads(args)
                call["function"] = fn
                converted.append(call)
            message["tool_calls"] = converted
        out.append(message)
    return out


def hermes_system_prompt(tools: list[ToolSpec]) -> str:
    """The tools section Qwen2.5's template writes into the system prompt."""
    specs = "\n".join(json.dumps(t.to_openai(), ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{specs}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def hermes_messages(messages: list[dict[str, Any]], tools: list[ToolSpec] | None
                    ) -> list[dict[str, Any]]:
    """Plain ``role``/``content`` messages carrying tools, calls and results as Hermes text,
    for a chat template that knows nothing of tools."""
    out: list[dict[str, Any]] = []
    for message in template_messages(messages):
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            parts = [message["content"]] if message["content"] else []
            for call in message["tool_calls"]:
                fn = call.get("function") or {}
                body = json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments")},
                                  ensure_ascii=False)
                parts.append(f"{TOOL_CALL_START}\n{body}\n{TOOL_CALL_END}")
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            text = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool_results": True})
        else:
            out.append({"role": role, "content": message["content"]})
    for message in out:
        message.pop("_tool_results", None)
    if tools:
        prompt = hermes_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# -- parsing --------------------------------------------------------------------------------


@dataclass(slots=True)
class ParsedOutput:
    """A model answer split into message content and tool calls."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)


def _call_from_json(body: str, tools: dict[str, ToolSpec], *, closed: bool) -> ToolCall:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        where = "is incomplete" if not closed else f"is not valid JSON ({exc.msg})"
        raise ToolCallError(f"the model's tool call {where}: {body.strip()[:200]!r}") from None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ToolCallError("the model's tool call is not a JSON object with a 'name': "
                            f"{body.strip()[:200]!r}")
    name = data["name"]
    if name not in tools:
        offered = ", ".join(sorted(tools)) or "none"
        raise ToolCallError(f"the model called '{name}', which is not among the offered "
                            f"tools ({offered})")
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):  # some models encode the arguments object as a string
        with contextlib.suppress(json.JSONDecodeError):
            args = json.loads(args)
    if not isinstance(args, dict):
        raise ToolCallError(f"the arguments of the model's call of '{name}' are not a JSON "
                            "object")
    spec = tools[name]
    if spec.strict and spec.parameters is not None:
        error = schema_errors(spec.parameters, args)
        if error:
            raise ToolCallError(f"the arguments of the model's call of '{name}' do not match "
                                f"its parameters schema: {error}")
    return ToolCall(new_call_id(), name, json.dumps(args, ensure_ascii=False))


_FENCE = re.compile(r"^```[A-Za-z]*[ \t]*\n(.*)\n```$", re.DOTALL)


def _bare_call(text: str, tools: dict[str, ToolSpec]) -> ToolCall | None:
    """The whole answer as one untagged call ``{"name": ..., "arguments": {...}}`` (also in a
    Markdown code fence), if it is one."""
    if fenced := _FENCE.match(text):
        text = fenced.group(1).strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if (isinstance(data, dict) and data.get("name") in tools and set(data) <= {"name", "arguments"}
            and isinstance(data.get("arguments", {}), dict)):
        return _call_from_json(text, tools, closed=True)
    return None


_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


def cut_call(body: str, tools: dict[str, ToolSpec]) -> ToolCall | None:
    """The call an answer cut off by ``max_tokens`` was making, as OpenAI returns it then:
    the function's name and its arguments text as far as it got (not valid JSON); ``None``
    when the model had not yet written the name of an offered function."""
    with contextlib.suppress(ToolCallError):
        return _call_from_json(body, tools, closed=False)
    name = _NAME.search(body)
    if name is None or name.group(1) not in tools:
        return None
    arguments = _ARGUMENTS.search(body, name.end()) or _ARGUMENTS.search(body)
    return ToolCall(new_call_id(), name.group(1),
                    body[arguments.end():].rstrip() if arguments else "")


def parse_hermes(text: str, tools: list[ToolSpec], *, parallel: bool = True,
                 cut: bool = False) -> ParsedOutput:
    """Split ``text`` into content and calls. Raises :class:`ToolCallError` on a block that
    cannot be returned as a call, except the last one of an answer ``cut`` off by
    ``max_tokens`` (:func:`cut_call`). Without ``parallel`` only the first call is kept."""
    by_name = {t.name: t for t in tools}
    start = text.find(TOOL_CALL_START)
    if start < 0:
        if cut:  # a tag the model had only begun to write is not content
            text = _drop_tag_start(text)
        bare = _bare_call(text.strip(), by_name)
        return ParsedOutput("", [bare]) if bare else ParsedOutput(text)
    # Only the whitespace right before the call goes: a stream cannot know a call will come
    # when it lets the text's beginning out (:class:`HermesStreamParser`), so both keep it.
    content = text[:start].rstrip()
    calls: list[ToolCall] = []
    rest = text[start:]
    while rest.startswith(TOOL_CALL_START):
        body = rest[len(TOOL_CALL_START):]
        end = body.find(TOOL_CALL_END)
        if end < 0:
            last = cut_call(body, by_name) if cut else _call_from_json(body, by_name,
                                                                        closed=False)
            calls += [last] if last is not None else []
            break
        calls.append(_call_from_json(body[:end], by_name, closed=True))
        rest = body[end + len(TOOL_CALL_END):].lstrip()
    # Anything after the last call is dropped, as vLLM does.
    return ParsedOutput(content, calls if parallel else calls[:1])


# -- streaming ------------------------------------------------------------------------------


@dataclass(slots=True)
class Emitted:
    """What one step of :class:`HermesStreamParser` lets out: content text and whole calls."""

    text: str = ""
    calls: list[ToolCall] = field(default_factory=list)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _drop_tag_start(text: str) -> str:
    """``text`` without a ``<tool_call>`` tag it ends in the middle of (and the space before)."""
    keep = _partial_suffix(text, TOOL_CALL_START)
    return text[:len(text) - keep].rstrip() if keep else text


class HermesStreamParser:
    """Turns streamed model text into content pieces and complete tool calls.

    Text is let out as soon as it cannot be part of a call; from a ``<tool_call>`` on, the
    block is held until its ``</tool_call>`` and then let out as one whole call (or a
    :class:`ToolCallError` raised), so a client never receives half a call. An answer that
    begins with ``{`` (or with a Markdown code fence holding ``{``) is held to the end, where
    it is read as an untagged call or let out as text. Whitespace right before a call is held back and dropped, as :func:`parse_hermes`
    strips the content.
    """

    def __init__(self, tools: list[ToolSpec], *, parallel: bool = True) -> None:
        self._tools = {t.name: t for t in tools}
        self._parallel = parallel
        self._buf = ""
        #: start | text | call | after | bare | done
        self._state = "start"
        self.calls = 0

    def feed(self, piece: str) -> Emitted:
        self._buf += piece
        out = Emitted()
        while True:
            state, buf = self._state, self._buf
            if state == "start":
                head = buf.lstrip()
                if not head or (TOOL_CALL_START.startswith(head) and head != TOOL_CALL_START):
                    return out
                if head.startswith(TOOL_CALL_START):
                    self._state, self._buf = "call", head[len(TOOL_CALL_START):]
                elif head.startswith("{"):
                    self._state = "bare"
                elif head.startswith("```"):  # a fenced untagged call, or just code?
                    first, newline, body = head.partition("\n")
                    if not newline or not body.strip():
                        if len(first) < 20:
                            return out
                        self._state = "text"
                    else:
                        self._state = "bare" if body.lstrip().startswith("{") else "text"
                elif head.startswith("`") and len(head) < 3:
                    return out
                else:
                    self._state = "text"
            elif state == "text":
                at = buf.find(TOOL_CALL_START)
                if at >= 0:
                    out.text += buf[:at].rstrip()
                    self._state, self._buf = "call", buf[at + len(TOOL_CALL_START):]
                    continue
                keep = _partial_suffix(buf, TOOL_CALL_START)
                emit = buf[:len(buf) - keep]
                stripped = emit.rstrip()
                out.text += stripped
                self._buf = emit[len(stripped):] + buf[len(buf) - keep:]
                return out
            elif state == "call":
                end = buf.find(TOOL_CALL_END)
                if end < 0:
                    return out
                out.calls.append(self._call(buf[:end], closed=True))
                self._buf = buf[end + len(TOOL_CALL_END):]
                self._state = "after" if self._parallel else "done"
            elif state == "after":
                head = buf.lstrip()
                if not head or (TOOL_CALL_START.startswith(head) and head != TOOL_CALL_START):
                    return out
                if head.startswith(TOOL_CALL_START):
                    self._state, self._buf = "call", head[len(TOOL_CALL_START):]
                else:
                    self._state, self._buf = "done", ""
            else:  # bare (held to the end) or done (the rest is dropped)
                if state == "done":
                    self._buf = ""
                return out

    def finish(self, cut: bool = False) -> Emitted:
        """The stream ended: let out what is held, or raise if it ends inside a call (unless
        the answer was ``cut`` off by ``max_tokens``: then as :func:`cut_call`)."""
        state, buf = self._state, self._buf
        self._state, self._buf = "done", ""
        if state in ("start", "text"):
            return Emitted(text=_drop_tag_start(buf) if cut else buf)
        if state == "call" and cut:
            call = cut_call(buf, self._tools)
            self.calls += call is not None
            return Emitted(calls=[call] if call is not None else [])
        if state == "call":
            return Emitted(calls=[self._call(buf, closed=False)])
        if state == "bare":
            bare = _bare_call(buf.strip(), self._tools)
            if bare is not None:
                self.calls += 1
                return Emitted(calls=[bare])
            return Emitted(text=buf)
        return Emitted()

    def _call(self, body: str, *, closed: bool) -> ToolCall:
        call = _call_from_json(body, self._tools, closed=closed)
        self.calls += 1
        return call

"""The typed OpenAI features a :class:`~backends.base.GenerationRequest` may ask for and a
:class:`~backends.base.Generation` / :class:`~backends.base.Chunk` may carry: tools and
tool calls, structured output (``response_format``) and token log-probabilities.

Each type converts from and to its OpenAI chat-completions wire shape (``from_openai`` /
``to_openai``), so the gateway's wire layer and the HTTP backend share one spelling. The
values here are already validated by whoever builds them; ``from_openai`` raises
:class:`ValueError` (with the offending parameter named) on a malformed shape.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

#: ``tool_choice`` as a string; a named function is a :class:`NamedToolChoice`.
ToolChoiceMode: TypeAlias = Literal["none", "auto", "required"]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One function the model may call (OpenAI ``tools[i]`` with ``type: function``)."""

    name: str
    description: str | None = None
    #: The arguments' JSON schema; ``None``: any JSON object.
    parameters: dict[str, Any] | None = None
    #: OpenAI's strict mode: the arguments must match ``parameters`` exactly.
    strict: bool | None = None

    @classmethod
    def from_openai(cls, tool: Any) -> ToolSpec:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError("tools: each tool must be {'type': 'function', 'function': {...}}")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError("tools: each function needs a non-empty 'name'")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools: parameters of '{fn['name']}' must be a JSON schema object")
        desc = fn.get("description")
        strict = fn.get("strict")
        return cls(fn["name"], desc if isinstance(desc, str) else None, params,
                   strict if isinstance(strict, bool) else None)

    def to_openai(self) -> dict[str, Any]:
        fn: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            fn["description"] = self.description
        if self.parameters is not None:
            fn["parameters"] = self.parameters
        if self.strict is not None:
            fn["strict"] = self.strict
        return {"type": "function", "function": fn}


@dataclass(frozen=True, slots=True)
class NamedToolChoice:
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: call this one."""

    name: str


ToolChoice: TypeAlias = ToolChoiceMode | NamedToolChoice


def tool_choice_from_openai(value: Any) -> ToolChoice:
    if value in ("none", "auto", "required"):
        return value  # type: ignore[no-any-return]
    if isinstance(value, dict):
        fn = value.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]:
            return NamedToolChoice(fn["name"])
    raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                     "{'type': 'function', 'function': {'name': ...}}")


def tool_choice_to_openai(choice: ToolChoice) -> str | dict[str, Any]:
    if isinstance(choice, NamedToolChoice):
        return {"type": "function", "function": {"name": choice.name}}
    return choice


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """OpenAI ``response_format``: free ``text``, any ``json_object``, or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    #: json_schema only: the schema's name (OpenAI requires one), the schema, strictness.
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None

    @classmethod
    def from_openai(cls, value: Any) -> ResponseFormat:
        kind = value.get("type") if isinstance(value, dict) else None
        if kind in ("text", "json_object"):
            return cls(kind)
        if kind != "json_schema":
            raise ValueError("response_format.type must be 'text', 'json_object' or 'json_schema'")
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError("response_format.json_schema needs a 'name'")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        strict, desc = spec.get("strict"), spec.get("description")
        return cls("json_schema", spec["name"], schema,
                   strict if isinstance(strict, bool) else None,
                   desc if isinstance(desc, str) else None)

    def to_openai(self) -> dict[str, Any]:
        if self.type != "json_schema":
            return {"type": self.type}
        spec: dict[str, Any] = {"name": self.name or "response", "schema": self.schema or {}}
        if self.strict is not None:
            spec["strict"] = self.strict
        if self.description is not None:
            spec["description"] = self.description
        return {"type": "json_schema", "json_schema": spec}


def new_call_id() -> str:
    """A tool call id in OpenAI's spelling: ``call_`` and 24 random alphanumerics."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "call_" + "".join(secrets.choice(alphabet) for _ in range(24))


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One complete function call the model made (assistant ``tool_calls[i]``)."""

    id: str
    name: str
    #: The arguments as a JSON text (always a valid JSON object when a backend returns it).
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a streamed tool call (``delta.tool_calls[i]``). The first piece of call
    ``index`` carries ``id`` and ``name`` (and ``arguments == ""``); later pieces carry only
    more ``arguments`` text, to be appended."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        fn: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            fn["name"] = self.name
        out["function"] = fn
        return out


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    #: The token's UTF-8 bytes (a token may hold part of a character).
    bytes: list[int] | None = None

    def to_openai(self) -> dict[str, Any]:
        return {"token": self.token, "logprob": self.logprob, "bytes": self.bytes}


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability (``choices[i].logprobs.content[j]``)."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    #: The most likely tokens at this position, best first (``top_logprobs`` of them).
    top_logprobs: list[TopLogprob] = field(default_factory=list)

    def to_openai(self) -> dict[str, Any]:
        return {"token": self.token, "logprob": self.logprob, "bytes": self.bytes,
                "top_logprobs": [t.to_openai() for t in self.top_logprobs]}

    @classmethod
    def from_openai(cls, entry: Any) -> TokenLogprob:
        """One ``logprobs.content[j]`` entry of a chat completion (or chunk)."""
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            raise ValueError("logprobs.content entries need a 'token'")
        tops = [TopLogprob(t["token"], float(t["logprob"]), _byte_list(t.get("bytes")))
                for t in entry.get("top_logprobs") or () if isinstance(t, dict)]
        return cls(entry["token"], float(entry["logprob"]), _byte_list(entry.get("bytes")), tops)


def _byte_list(value: Any) -> list[int] | None:
    if isinstance(value, list) and all(isinstance(b, int) for b in value):
        return value
    return None


def logprobs_from_openai(value: Any) -> list[TokenLogprob] | None:
    """``choices[i].logprobs`` of a chat answer (``{"content": [...]}``) or of a legacy
    completion (``{"tokens", "token_logprobs", "top_logprobs"}``) → entries; ``None`` if
    absent."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("content"), list):
        return [TokenLogprob.from_openai(e) for e in value["content"]]
    tokens, lps = value.get("tokens"), value.get("token_logprobs")
    if isinstance(tokens, list) and isinstance(lps, list):
        tops = value.get("top_logprobs") or [None] * len(tokens)
        out = []
        for token, lp, top in zip(tokens, lps, tops, strict=False):
            if lp is None:
                continue
            entries = [TopLogprob(str(t), float(p)) for t, p in (top or {}).items()]
            entries.sort(key=lambda t: t.logprob, reverse=True)
            out.append(TokenLogprob(str(token), float(lp), list(str(token).encode()), entries))
        return out
    return None

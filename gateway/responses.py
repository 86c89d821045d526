"""``POST /v1/responses``: OpenAI's Responses API on the same steps as a chat completion
(:mod:`gateway.pipeline`, :mod:`gateway.steps`): routing, budgets, energy, fallback,
metrics and the access log are the chat path's.

1. take the policy snapshot; authenticate the key → tenant;
2. :func:`_read`: the body, validated (:class:`ResponsesRequest`; every field is used,
   accepted and dropped — named in ``X-Joulegate-Dropped-Params`` — or refused with a 400
   that lists every invalid field), translated into a chat :class:`GenerationRequest`:
   ``instructions`` → a system message; ``input`` (a string, or ``message`` /
   ``function_call`` / ``function_call_output`` items) → chat messages (an assistant's
   ``tool_calls``, ``tool`` messages); flat function ``tools`` → :class:`ToolSpec`;
   ``text.format`` → :class:`ResponseFormat`; ``max_output_tokens`` → ``max_tokens``;
   ``include: ["message.output_text.logprobs"]`` → ``logprobs`` (with ``top_logprobs``
   alternatives, 0..20; ``top_logprobs`` alone returns none, as OpenAI's does);
3. the shared steps: plan (:func:`~gateway.steps.plan`: among the tiers that can serve
   tools, structured output and log-probabilities, when the request uses them), admit
   (reserve joules), the plan's tier with its energy share open (through the cascade, as
   for chat, when the tenant's estimator is ``cascade``: :mod:`gateway.cascade`), then
   :func:`~gateway.steps.finish`;
4. the answer: a ``response`` object — ``output`` holds a ``message`` item (``output_text``)
   and/or ``function_call`` items; ``status`` is ``incomplete`` (``incomplete_details.reason:
   max_output_tokens``) when the output was cut; ``usage`` has ``input_tokens``,
   ``output_tokens``, ``total_tokens``, their details, ``energy_joules`` and
   ``energy_source``; each ``output_text`` part's ``logprobs`` (``token``, ``logprob``,
   ``bytes``, ``top_logprobs``) when the request included them. With ``stream: true``:
   server-sent events ``event: <type>`` / ``data: {json}`` with increasing
   ``sequence_number`` s — ``response.created``, ``response.in_progress``; per message
   ``response.output_item.added``, ``response.content_part.added``,
   ``response.output_text.delta`` ...,
   ``response.output_text.done``, ``response.content_part.done``,
   ``response.output_item.done``; per function call ``response.output_item.added``,
   ``response.function_call_arguments.delta`` ..., ``response.function_call_arguments.done``,
   ``response.output_item.done``; then ``response.completed`` (or ``response.incomplete``)
   carrying the whole response and its usage. A backend failure after the first event ends
   the stream with ``response.failed`` (``error.code: server_error``); nothing is cut.

Nothing is stored: ``store`` is accepted (``store: true`` is dropped: the answer says
``store: false``), and ``previous_response_id``, ``conversation``, ``prompt`` and
``background: true`` are refused with a 400 — clients send the whole conversation
(``function_call`` items with their ``function_call_output`` s), as the OpenAI Agents SDK
and LangChain do by default.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError
from starlette.requests import Request
from starlette.responses import Response

from backends import BackendError, Chunk, GenerationRequest
from backends.features import (
    NamedToolChoice,
    ResponseFormat,
    TokenLogprob,
    ToolCall,
    ToolChoice,
    ToolSpec,
)

from . import cascade
from .call import Call
from .errors import APIError, InvalidRequest
from .openai_types import MAX_TOP_LOGPROBS, TextLogprobs, answer_logprobs, refuse_drops
from .pipeline import run_request
from .runtime import Runtime, Snapshot
from .steps import (
    answer_headers,
    complete_on,
    on_its_tier,
    plan,
    read_body,
    request_id,
    take_tokens,
)
from .streaming import SSEResponse, first_chunk, stream_response

log = logging.getLogger("joulegate")

#: The ``include`` value that asks for the output text's log-probabilities.
LOGPROBS_INCLUDE = "message.output_text.logprobs"

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
#: The same bounds as chat (:mod:`gateway.openai_types`).
MAX_TOKENS_CAP = 1 << 20
MAX_ITEMS = 4096
MAX_TOOLS = 128
_ID = Field(None, max_length=256)
_Status = Literal["in_progress", "completed", "incomplete"]


# -- the request -------------------------------------------------------------------------

class InputText(BaseModel):
    model_config = _STRICT
    type: Literal["input_text"]
    text: str


class OutputText(BaseModel):
    """An assistant's text, as a client sends back an earlier answer's output item."""

    model_config = _STRICT
    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None  # echoed back by clients; not passed on
    logprobs: list[Any] | None = None


class Refusal(BaseModel):
    model_config = _STRICT
    type: Literal["refusal"]
    refusal: str


def _kind(value: Any) -> str | None:
    return value.get("type") if isinstance(value, dict) else None


_PART_TAGS = {"input_text", "output_text", "refusal"}


def _part_tag(value: Any) -> str:
    kind = _kind(value)
    return kind if kind in _PART_TAGS else "unsupported"


class _Unsupported(BaseModel):
    """Anything of a ``type`` not listed: refused by that name (``refused`` says what is)."""

    model_config = ConfigDict(extra="allow", strict=True)
    refused: ClassVar[str]
    type: Any = None

    @field_validator("type")
    @classmethod
    def _refuse(cls, kind: Any) -> Any:
        raise PydanticCustomError("unsupported_value", cls.refused,
                                  {"kind": kind if isinstance(kind, str) else type(kind).__name__})


class UnsupportedPart(_Unsupported):
    """Any other content part (images, files, audio)."""

    refused = ("content parts of type '{kind}' are not supported; only input_text, output_text "
               "and refusal are")


ContentPart = Annotated[
    Annotated[InputText, Tag("input_text")] | Annotated[OutputText, Tag("output_text")]
    | Annotated[Refusal, Tag("refusal")] | Annotated[UnsupportedPart, Tag("unsupported")],
    Discriminator(_part_tag)]


class MessageItem(BaseModel):
    """``{"type": "message", "role", "content"}`` (``type`` may be left out)."""

    model_config = _STRICT
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = _ID
    status: _Status | None = None
    phase: Literal["commentary", "final_answer"] | None = None  # not passed on

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.refusal if isinstance(p, Refusal) else p.text  # type: ignore[union-attr]
                         for p in self.content)


class FunctionCallItem(BaseModel):
    """A call the model made earlier (an answer's ``function_call`` output item)."""

    model_config = _STRICT
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    arguments: str
    id: str | None = _ID
    status: _Status | None = None
    namespace: None = None
    caller: None = None


class FunctionCallOutputItem(BaseModel):
    """What the client's function returned, for ``call_id``."""

    model_config = _STRICT
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[ContentPart]
    id: str | None = _ID
    status: _Status | None = None
    name: str | None = Field(None, max_length=256)
    namespace: None = None
    caller: None = None

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "\n".join(p.refusal if isinstance(p, Refusal) else p.text  # type: ignore[union-attr]
                         for p in self.output)


class ReasoningItem(BaseModel):
    """A reasoning model's reasoning from an earlier turn, handed back as clients do without
    ``previous_response_id`` (the Agents SDK, when an agent on a reasoning model hands off to
    one served here; LiteLLM). Accepted and not passed on, like OpenAI's own non-reasoning
    models take it: no tier here reasons in that form, and its summary is the other model's
    working, not the conversation. Named in the dropped parameters."""

    model_config = _STRICT
    type: Literal["reasoning"]
    id: str | None = _ID
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    status: _Status | None = None


class UnsupportedItem(_Unsupported):
    """Any other input item (``item_reference``, hosted tools' calls)."""

    refused = ("input items of type '{kind}' are not supported; only message, function_call, "
               "function_call_output and reasoning are (nothing is stored, so send the whole "
               "conversation)")


_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


def _item_tag(value: Any) -> str:
    if not isinstance(value, dict):
        return "message"  # and fails there as "not an object"
    kind = value.get("type", "message")
    return kind if kind in _ITEM_TYPES else "unsupported"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[UnsupportedItem, Tag("unsupported")],
    Discriminator(_item_tag)]


class ResponsesFunctionTool(BaseModel):
    """A Responses function tool: flat, unlike chat's ``{"type", "function": {...}}``."""

    model_config = _STRICT
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: Literal[False] | None = None
    allowed_callers: list[Literal["direct"]] | None = None
    output_schema: None = None

    def spec(self) -> ToolSpec:
        return ToolSpec(self.name, self.description, self.parameters, self.strict)

    def echo(self) -> dict[str, Any]:
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters, "strict": self.strict}


class UnsupportedTool(BaseModel):
    """Any tool but a function (hosted tools: web search, file search, MCP, ...)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Any = None

    @field_validator("type")
    @classmethod
    def _refuse(cls, kind: Any) -> Any:
        raise PydanticCustomError(
            "unsupported_value", "tools of type '{kind}' are not supported; only function "
            "tools are", {"kind": kind if isinstance(kind, str) else type(kind).__name__})


def _tool_tag(value: Any) -> str:
    return "function" if _kind(value) == "function" else "unsupported"


Tool = Annotated[Annotated[ResponsesFunctionTool, Tag("function")]
                 | Annotated[UnsupportedTool, Tag("unsupported")], Discriminator(_tool_tag)]


class NamedFunction(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)


class TextFormatPlain(BaseModel):
    model_config = _STRICT
    type: Literal["text"]


class TextFormatJSONObject(BaseModel):
    model_config = _STRICT
    type: Literal["json_object"]


class TextFormatJSONSchema(BaseModel):
    model_config = _STRICT
    type: Literal["json_schema"]
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


TextFormat = Annotated[TextFormatPlain | TextFormatJSONObject | TextFormatJSONSchema,
                       Field(discriminator="type")]


class TextConfig(BaseModel):
    model_config = _STRICT
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # dropped


class ResponsesStreamOptions(BaseModel):
    model_config = _STRICT
    include_obfuscation: bool | None = None  # dropped: nothing is obfuscated


class ResponsesRequest(BaseModel):
    """The body of ``POST /v1/responses``. Each field is used, dropped (accepted, not passed
    on: :meth:`dropped_params`) or refused (anything unknown, and the stateful fields)."""

    model_config = _STRICT
    # used
    model: str = Field(min_length=1, max_length=256)
    input: str | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_ITEMS)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: bool | None = None
    user: str | None = Field(None, max_length=256)
    # echoed in the answer only
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    store: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # accepted and dropped (named in X-Joulegate-Dropped-Params when given)
    stream_options: ResponsesStreamOptions | None = None
    include: list[Annotated[str, Field(max_length=128)]] | None = Field(None, max_length=32)
    reasoning: dict[str, Any] | None = None
    service_tier: str | None = Field(None, max_length=32)
    prompt_cache_key: str | None = Field(None, max_length=256)
    prompt_cache_retention: str | None = Field(None, max_length=32)
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = Field(None, max_length=256)
    max_tool_calls: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    context_management: list[Any] | None = None
    # refused unless empty: nothing is stored, nothing runs in the background
    previous_response_id: str | None = None
    conversation: Any = None
    prompt: Any = None
    background: bool | None = None
    # used with include: ["message.output_text.logprobs"]
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("previous_response_id", "conversation", "prompt")
    @classmethod
    def _stateless(cls, value: Any) -> Any:
        if value is not None:
            raise PydanticCustomError(
                "unsupported_value", "joulegate stores no responses or conversations: send the "
                "whole conversation in 'input' (message, function_call and function_call_output "
                "items) instead")
        return value

    @field_validator("background")
    @classmethod
    def _foreground(cls, value: bool | None) -> bool | None:
        if value:
            raise PydanticCustomError("unsupported_value", "background responses are not "
                                      "supported")
        return value

    @property
    def wants_logprobs(self) -> bool:
        """The answer's ``output_text`` parts carry their tokens' log-probabilities."""
        return LOGPROBS_INCLUDE in (self.include or ())

    def dropped_params(self) -> list[str]:
        """Fields accepted but not passed on to the backend."""
        dropped = [name for name in (
            "reasoning", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
            "safety_identifier", "max_tool_calls", "context_management")
            if getattr(self, name) is not None]
        if any(value != LOGPROBS_INCLUDE for value in self.include or ()):
            dropped.append("include")
        if self.top_logprobs and not self.wants_logprobs:
            dropped.append("top_logprobs")
        if self.store:
            dropped.append("store")
        if self.truncation == "auto":
            dropped.append("truncation")
        if self.service_tier not in (None, "auto", "default"):
            dropped.append("service_tier")
        if self.stream_options is not None and self.stream_options.include_obfuscation:
            dropped.append("stream_options.include_obfuscation")
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            dropped.append("text.verbosity")
        if isinstance(self.input, list):
            dropped.extend(f"input[{i}].phase" for i, item in enumerate(self.input)
                           if isinstance(item, MessageItem) and item.phase is not None)
            dropped.extend(f"input[{i}]" for i, item in enumerate(self.input)
                           if isinstance(item, ReasoningItem))
        return dropped

    # -- translation ---------------------------------------------------------------------

    def messages(self) -> list[dict[str, Any]]:
        """``instructions`` and ``input`` as chat messages in OpenAI's wire shape."""
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
            return messages
        calls: set[str] = set()
        for i, item in enumerate(self.input):
            if isinstance(item, MessageItem):
                role = "system" if item.role == "developer" else item.role
                messages.append({"role": role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                calls.add(item.call_id)
                call = ToolCall(item.call_id, item.name, item.arguments).to_openai()
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)  # one turn, several calls
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                if item.call_id not in calls:
                    raise InvalidRequest(
                        f"input[{i}]: no function_call item with call_id '{item.call_id}' "
                        "comes before this function_call_output; joulegate stores no responses "
                        "(previous_response_id is not supported), so send the function_call "
                        "item too", param=f"input[{i}].call_id", code="invalid_value")
                tool: dict[str, Any] = {"role": "tool", "tool_call_id": item.call_id,
                                        "content": item.text()}
                if item.name is not None:
                    tool["name"] = item.name
                messages.append(tool)
        if not messages:  # nothing but reasoning items
            raise InvalidRequest("'input' holds no message, function_call or "
                                 "function_call_output item: nothing to answer", param="input",
                                 code="invalid_value")
        return messages

    def functions(self) -> list[ResponsesFunctionTool]:
        """The tools (validation leaves only functions)."""
        return [t for t in self.tools or () if isinstance(t, ResponsesFunctionTool)]

    def tool_choice_value(self) -> ToolChoice | None:
        choice = self.tool_choice
        if isinstance(choice, NamedFunction):
            if not any(t.name == choice.name for t in self.functions()):
                raise InvalidRequest(f"tool_choice names the function '{choice.name}', which is "
                                     "not in tools", param="tool_choice.name",
                                     code="invalid_value")
            return NamedToolChoice(choice.name)
        if choice == "required" and not self.tools:
            raise InvalidRequest("tool_choice 'required' needs at least one function in tools",
                                 param="tool_choice", code="invalid_value")
        return choice

    def response_format(self) -> ResponseFormat | None:
        fmt = self.text.format if self.text is not None else None
        if isinstance(fmt, TextFormatJSONSchema):
            return ResponseFormat("json_schema", fmt.name, fmt.schema_, fmt.strict,
                                  fmt.description)
        if isinstance(fmt, TextFormatJSONObject):
            return ResponseFormat("json_object")
        return None

    def to_generation(self, request_id: str) -> GenerationRequest:
        return GenerationRequest(
            model=self.model, messages=self.messages(), max_tokens=self.max_output_tokens,
            temperature=self.temperature, top_p=self.top_p, user=self.user,
            request_id=request_id,
            tools=[t.spec() for t in self.functions()] or None,
            tool_choice=self.tool_choice_value(), parallel_tool_calls=self.parallel_tool_calls,
            response_format=self.response_format(), logprobs=self.wants_logprobs,
            top_logprobs=self.top_logprobs if self.wants_logprobs else None)

    def echo(self) -> dict[str, Any]:
        """The request's settings, as every response object repeats them."""
        fmt = self.text.format if self.text is not None else None
        text: dict[str, Any] = {"format": {"type": "text"}, "verbosity": "medium"}
        if isinstance(fmt, TextFormatJSONSchema):
            text["format"] = {"type": "json_schema", "name": fmt.name, "schema": fmt.schema_,
                              "strict": fmt.strict, "description": fmt.description}
        elif fmt is not None:
            text["format"] = {"type": fmt.type}
        choice = self.tool_choice
        return {
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "parallel_tool_calls": True if self.parallel_tool_calls is None
            else self.parallel_tool_calls,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "store": False, "temperature": self.temperature, "text": text,
            "tool_choice": choice.model_dump() if isinstance(choice, NamedFunction)
            else (choice or "auto"),
            "tools": [t.echo() for t in self.functions()], "top_p": self.top_p,
            "truncation": self.truncation or "disabled", "user": self.user,
            "top_logprobs": self.top_logprobs, "background": False, "service_tier": "default",
        }


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in (*_ITEM_TYPES, "unsupported", "input_text", "output_text", "refusal",
                      "text", "json_object", "json_schema", "str", "list[tagged-union[...]]",
                      "NamedFunction", "literal['none','auto','required']") and out:
            continue  # a union's branch name, not a field
        elif isinstance(part, str) and part.startswith(("list[", "literal[", "function-")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(err: ErrorDetails) -> tuple[str, str, str]:
    """(param, code, what is wrong) of one validation error."""
    kind, param = err["type"], _param(tuple(err["loc"]))
    if kind == "extra_forbidden":
        return param, "unsupported_parameter", f"'{param}' is not supported by joulegate"
    if kind == "missing":
        return param, "missing_required_parameter", f"'{param}' is required"
    if kind == "unsupported_value":
        return param, "unsupported_value", f"'{param}': {err['msg']}"
    if kind.endswith(("_type", "_parsing")):
        return param, "invalid_type", f"'{param}': {err['msg'][:1].lower()}{err['msg'][1:]}"
    return param, "invalid_value", f"'{param}': {err['msg'][:1].lower()}{err['msg'][1:]}"


def parse_request(body: bytes) -> ResponsesRequest:
    """``body`` as a :class:`ResponsesRequest`, or one 400 that lists every invalid field."""
    try:
        return ResponsesRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            raise InvalidRequest("the request body is not valid JSON",
                                 code="invalid_json") from None
        if first["type"] in ("model_type", "model_attributes_type") and not first["loc"]:
            raise InvalidRequest("the request body must be a JSON object",
                                 code="invalid_json") from None
        found = [_describe(err) for err in errors]
        every = {param for param, _, _ in found}
        described: dict[str, tuple[str, str]] = {}
        for param, code, what in found:
            # A union tries each branch: a branch that failed deeper (inside a list or an
            # object) says more than one that failed on the value's type; and one message
            # per field, a wrong value's rather than a wrong type's.
            if any(p.startswith((param + ".", param + "[")) for p in every if p != param):
                continue
            if param not in described or described[param][0] == "invalid_type":
                described[param] = (code, what)
        params = list(described)
        message = "; ".join(what for _, what in described.values())
        if len(params) > 1:
            message = f"{len(params)} invalid fields: {message}"
        refusal = InvalidRequest(message, param=params[0], code=described[params[0]][0])
        refusal.rejected_params = tuple(params)
        raise refusal from None


# -- the call ----------------------------------------------------------------------------

@dataclass(slots=True)
class ResponsesCall(Call):
    """A :class:`~gateway.call.Call` answered in the Responses format."""

    body: ResponsesRequest | None = None
    response_id: str = field(default_factory=lambda: "resp_" + os.urandom(16).hex())

    @property
    def endpoint(self) -> str:
        return "responses"

    @property
    def chat_fields(self) -> bool:
        """Its body's names are not chat's: its dropped fields are named when it is read
        (:meth:`ResponsesRequest.dropped_params`), as they were sent."""
        return False

    @property
    def request(self) -> ResponsesRequest:
        assert self.body is not None
        return self.body

    def usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": self.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.prompt_tokens + self.completion_tokens}
        if self.energy is not None:
            usage.update(energy_joules=round(self.joules, 6), energy_source=self.energy.source)
            usage.update(self.footprint_usage())
        return usage

    def response(self, status: str, output: list[dict[str, Any]], *,
                 usage: bool = True, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response object in ``status``."""
        model = self.plan.tier.model if self.plan is not None else self.model
        return {
            "id": self.response_id, "object": "response", "created_at": self.created,
            "status": status, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
            else None,
            "model": model, "output": output, **self.request.echo(),
            "usage": self.usage() if usage else None,
            "completed_at": int(time.time()) if status == "completed" else None,
        }


async def handle_responses(runtime: Runtime, request: Request) -> Response:
    """Serve ``POST /v1/responses``."""
    async def answer(runtime: Runtime, snap: Snapshot, call: ResponsesCall) -> Response:
        return await (_open_stream if call.stream else _complete)(runtime, snap, call)

    return await run_request(runtime, request, ResponsesCall(request_id(request), chat=True),
                             _read, answer, plan)


async def _read(snap: Snapshot, call: ResponsesCall, request: Request) -> None:
    server = snap.policy.server
    body = call.body = parse_request(await read_body(request, server.max_body_bytes,
                                                     server.limits.body_read_timeout_s))
    call.stream, call.model = bool(body.stream), body.model
    call.dropped_params = body.dropped_params()
    refuse_drops(call.dropped_params, snap.policy.tenants[call.who].unsupported_params)
    call.generation = generation = body.to_generation(call.request_id)
    call.prompt_estimate = prompt_estimate(generation)


def prompt_estimate(generation: GenerationRequest) -> int:
    """About 4 characters per token, plus a few tokens of chat framing per message; the
    tools' and the schema's JSON count, as the backend puts them in the prompt."""
    chars = 0
    for m in generation.messages or ():
        chars += len(m.get("content") or "") + 16
        for c in m.get("tool_calls") or ():
            chars += len(c["function"]["name"]) + len(c["function"]["arguments"])
    for tool in generation.tools or ():
        chars += len(orjson.dumps(tool.to_openai()))
    if generation.response_format is not None and generation.response_format.schema:
        chars += len(orjson.dumps(generation.response_format.schema))
    return chars // 4 + 1


# -- the whole answer --------------------------------------------------------------------

def _new_id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def message_item(item_id: str, text: str, status: str,
                 logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [] if text is None else [_text_part(text, logprobs)]}


def _text_part(text: str, logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [],
            "logprobs": response_logprobs(logprobs)}


def response_logprobs(entries: list[TokenLogprob] | None) -> list[dict[str, Any]]:
    """An ``output_text`` part's (or text event's) ``logprobs``: the chat entries, with each
    token's UTF-8 ``bytes`` always given (the Responses schema requires them)."""
    def filled(entry: dict[str, Any]) -> dict[str, Any]:
        if entry.get("bytes") is None:
            entry["bytes"] = list(entry["token"].encode())
        return entry

    out = []
    for e in entries or ():
        entry = filled(e.to_openai())
        entry["top_logprobs"] = [filled(t) for t in entry["top_logprobs"]]
        out.append(entry)
    return out


def call_item(item_id: str, call_id: str, name: str, arguments: str,
              status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id,
            "name": name, "arguments": arguments}


def _status(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


async def _complete(runtime: Runtime, snap: Snapshot, call: ResponsesCall) -> Response:
    result = await cascade.on_plan(runtime, snap, call, on_its_tier(snap, complete_on),
                                   cascade.whole)
    call.prompt_tokens = result.usage.prompt_tokens
    call.completion_tokens = result.usage.completion_tokens
    status = _status(result.finish_reason)
    output: list[dict[str, Any]] = []
    if result.text or not result.tool_calls:
        output.append(message_item(_new_id("msg_"), result.text, status,
                                   answer_logprobs(result.logprobs, result.text,
                                                   result.tool_calls)))
    for tc in result.tool_calls or ():
        output.append(call_item(_new_id("fc_"), tc.id, tc.name, tc.arguments, "completed"))
    return Response(orjson.dumps(call.response(status, output)), media_type="application/json",
                    headers=answer_headers(call))


# -- the stream --------------------------------------------------------------------------

class ResponsesSSE(SSEResponse):
    """:class:`~gateway.streaming.SSEResponse` for Responses events: a stream the server's
    shutdown stops ends with an ``error`` event (code ``server_shutting_down``)."""

    def __init__(self, content: AsyncGenerator[bytes, None], cleanup: Any,
                 headers: dict[str, str], events: _Events):
        super().__init__(content, cleanup, headers)
        self._events = events

    def shutdown_tail(self) -> bytes:
        return self._events.event("error", code="server_shutting_down", param=None,
                                  message="the server is shutting down; retry the request")


class _Events:
    """Numbered SSE events of one response, and the output items as they build up."""

    def __init__(self, call: ResponsesCall):
        self.call = call
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        #: The output index of the message now receiving text, if one is open.
        self.message: int | None = None
        #: A streamed call's ``index`` → its output index.
        self.calls: dict[int, int] = {}
        self.open: list[int] = []
        #: Which streamed log-probabilities are the output text's.
        self.logprobs = TextLogprobs()

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    def lifecycle(self, kind: str, status: str, **extra: Any) -> bytes:
        return self.event(kind, response=self.call.response(
            status, self.output, usage=kind not in ("response.created", "response.in_progress"),
            **extra))

    def _add(self, item: dict[str, Any]) -> tuple[int, bytes]:
        index = len(self.output)
        self.output.append(item)
        self.open.append(index)
        return index, self.event("response.output_item.added", output_index=index,
                                 item={**item, "content": []} if item["type"] == "message"
                                 else item)

    def text(self, delta: str, logprobs: list[TokenLogprob] | None = None) -> list[bytes]:
        out: list[bytes] = []
        if self.message is None:
            out.extend(self.close_all())
            index, added = self._add(message_item(_new_id("msg_"), "", "in_progress"))
            self.message = index
            item = self.output[index]
            out.append(added)
            out.append(self.event("response.content_part.added", item_id=item["id"],
                                  output_index=index, content_index=0,
                                  part={"type": "output_text", "text": "", "annotations": []}))
        index = self.message
        item = self.output[index]
        part = item["content"][0]
        part["text"] += delta
        entries = response_logprobs(logprobs)
        part["logprobs"].extend(entries)
        out.append(self.event("response.output_text.delta", item_id=item["id"],
                              output_index=index, content_index=0, delta=delta,
                              logprobs=entries))
        return out

    def tool_call(self, index: int, call_id: str | None, name: str | None,
                  arguments: str) -> list[bytes]:
        out: list[bytes] = []
        if index not in self.calls:
            out.extend(self.close_all())
            position, added = self._add(call_item(_new_id("fc_"), call_id or _new_id("call_"),
                                                  name or "", "", "in_progress"))
            self.calls[index] = position
            out.append(added)
        position = self.calls[index]
        item = self.output[position]
        if arguments:
            item["arguments"] += arguments
            out.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                  output_index=position, delta=arguments))
        return out

    def close_all(self, status: str = "completed") -> list[bytes]:
        out: list[bytes] = []
        for index in self.open:
            item = self.output[index]
            item["status"] = status
            if item["type"] == "message":
                part = item["content"][0]
                out.append(self.event("response.output_text.done", item_id=item["id"],
                                      output_index=index, content_index=0, text=part["text"],
                                      logprobs=part["logprobs"]))
                out.append(self.event("response.content_part.done", item_id=item["id"],
                                      output_index=index, content_index=0, part=part))
            else:
                item["status"] = "completed"
                out.append(self.event("response.function_call_arguments.done",
                                      item_id=item["id"], output_index=index,
                                      name=item["name"], arguments=item["arguments"]))
            out.append(self.event("response.output_item.done", output_index=index, item=item))
        self.open = []
        self.message = None
        return out


async def _open_stream(runtime: Runtime, snap: Snapshot, call: ResponsesCall) -> Response:
    """The stream of Responses events, once the backend's first chunk came."""
    chunks, first = await cascade.on_plan(runtime, snap, call, on_its_tier(snap, first_chunk),
                                          cascade.streamed)
    call.first_token_s = time.perf_counter() - call.started
    events = _Events(call)
    return stream_response(runtime, snap, call, chunks, _stream_events(call, events, chunks, first),
                           lambda body, cleanup, headers: ResponsesSSE(body, cleanup, headers,
                                                                       events))


async def _stream_events(call: ResponsesCall, events: _Events, chunks: AsyncIterator[Chunk],
                         first: Chunk) -> AsyncGenerator[bytes, None]:
    """The SSE byte stream; events known at the same moment go out as one write."""
    parts = [events.lifecycle("response.created", "in_progress"),
             events.lifecycle("response.in_progress", "in_progress")]
    chunk: Chunk | None = first
    try:
        while True:
            if chunk is None:  # the backend ended without a finish reason
                chunk = Chunk(finish_reason="stop")
            entries = events.logprobs.take(chunk)
            if chunk.text:
                parts.extend(events.text(chunk.text, entries))
            for delta in chunk.tool_calls or ():
                parts.extend(events.tool_call(delta.index, delta.id, delta.name,
                                              delta.arguments))
            if chunk.usage is not None:
                generation = call.req
                if generation.overran and chunk.usage.prompt_tokens == 0:
                    take_tokens(call)  # cut before the upstream's usage: the estimate
                    chunk.usage.prompt_tokens = call.prompt_tokens
                call.prompt_tokens = chunk.usage.prompt_tokens
                call.completion_tokens = chunk.usage.completion_tokens
            if chunk.finish_reason is not None:
                status = _status(chunk.finish_reason)
                if not events.output:  # nothing generated: still one (empty) message
                    parts.extend(events.text(""))
                parts.extend(events.close_all("incomplete" if status == "incomplete"
                                              else "completed"))
                call.settle_energy()
                parts.append(events.lifecycle(
                    "response.completed" if status == "completed" else "response.incomplete",
                    status))
                yield b"".join(parts)
                return
            if parts:
                yield b"".join(parts)
                parts = []
            chunk = await anext(chunks, None)
    except BackendError as exc:  # after the headers: the response failed, said as an event
        err = call.failed(exc)
        parts.append(_failed(call, events, err.message))
        yield b"".join(parts)
    except Exception:  # a bug, not the backend: still a proper end, and logged
        log.exception("stream %s failed", call.request_id)
        call.failed(APIError("internal error", status=500, code="internal_error"))
        parts.append(_failed(call, events, "internal error; see the gateway log"))
        yield b"".join(parts)


def _failed(call: ResponsesCall, events: _Events, message: str) -> bytes:
    take_tokens(call)
    call.settle_energy()
    return events.lifecycle("response.failed", "failed",
                            error={"code": "server_error", "message": message})

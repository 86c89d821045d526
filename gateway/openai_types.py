"""The OpenAI wire format: validated requests in, response dictionaries out.

Requests are parsed straight from the body bytes by pydantic in strict mode, so a wrong
type is an error rather than a coercion. Every field of OpenAI's request bodies is known,
typed and bounded; how each is handled (passed on, translated, dropped or refused) is the
table of :mod:`gateway.fields`. An unknown field is refused, and a 400 names every invalid
field of the body at once.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from backends.base import Chunk, GenerationRequest
from backends.features import TokenLogprob, ToolCall, ToolCallDelta

from . import fields
from .errors import InvalidRequest

# No NaN or Infinity: JSON has neither, and no backend samples with them.
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
#: Bounds of the numeric fields, to what every backend accepts: a seed is a signed 64-bit
#: integer upstream (vLLM, llama.cpp); a larger value passed validation and failed there.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1
MAX_TOKENS_CAP = 1 << 20
MAX_STOP_CHARS = 512
MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "tool", "function": "function"}
_FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"
#: The OpenAPI schema of a field refused unless null.
_NULL_ONLY: dict[str, Any] = {"type": "null"}


def _refused(what: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported_value", "{what}", {"what": what})


def _text(content: Any, parts: tuple[str, ...] = ("text",)) -> str:
    """A message's content as one string: a string, or text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise PydanticCustomError("invalid_type", "content must be a string or a list of "
                                  "text parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" else "text"
        if (kind not in parts or not isinstance(part.get(key), str)
                or not set(part) <= {"type", key, "prompt_cache_breakpoint"}):
            shown = kind if isinstance(kind, str) else type(part).__name__
            raise PydanticCustomError(
                "unsupported_content", "content part of type '{kind}' is not supported; "
                "only parts of type 'text' are", {"kind": shown})
        texts.append(part[key])
    return "\n".join(texts)


class FunctionCallParam(BaseModel):
    model_config = _STRICT
    name: str = Field(min_length=1, max_length=256)
    arguments: str


class NamedFunctionParam(BaseModel):
    """The legacy ``function_call: {"name": ...}``: call this function."""

    model_config = _STRICT
    name: str = Field(min_length=1, max_length=256)


class ToolCallParam(BaseModel):
    """An assistant message's earlier call."""

    model_config = _STRICT
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallParam


#: Fields a client library keeps on the messages it returns (LiteLLM), dropped on the way in.
CLIENT_MESSAGE_FIELDS = ("provider_specific_fields", "reasoning_content", "thinking_blocks")


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: str
    content: Any = None
    name: str | None = Field(None, max_length=256)
    #: An assistant message's calls, and a tool message's answer to one.
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)
    refusal: str | None = None
    #: What LiteLLM's client puts on a message it returned, when the caller sends that
    #: message back: accepted, never passed on (see gateway/fields.py).
    provider_specific_fields: Any = None
    reasoning_content: Any = None
    thinking_blocks: Any = None
    audio: Any = Field(None, json_schema_extra=_NULL_ONLY)
    #: The legacy ``functions`` API's: an assistant message's one call (its result comes
    #: back in a ``function`` message naming it); read as a tool call and its answer.
    function_call: FunctionCallParam | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, role: str) -> str:
        if role not in _ROLES:
            raise PydanticCustomError(
                "unsupported_role", "role '{role}' is not supported; use system, developer, user, "
                "assistant, tool or function", {"role": role})
        return _ROLES[role]

    @field_validator("audio")
    @classmethod
    def _audio(cls, value: Any) -> None:
        if value is not None:
            raise _refused("audio is not supported")

    @model_validator(mode="after")
    def _by_role(self) -> ChatMessage:
        role = self.role
        if self.tool_calls is not None and role != "assistant":
            raise PydanticCustomError("invalid_value", "only assistant messages have tool_calls",
                                      {"field": "tool_calls"})
        if self.tool_call_id is not None and role != "tool":
            raise PydanticCustomError("invalid_value", "only tool messages have a tool_call_id",
                                      {"field": "tool_call_id"})
        if role == "tool" and self.tool_call_id is None:
            raise PydanticCustomError("missing_field", "missing required parameter",
                                      {"field": "tool_call_id"})
        if self.function_call is not None and (role != "assistant" or self.tool_calls):
            raise PydanticCustomError("invalid_value", "only assistant messages without "
                                      "tool_calls have a function_call", {"field": "function_call"})
        if role == "function" and self.name is None:
            raise PydanticCustomError("missing_field", "missing required parameter",
                                      {"field": "name"})
        if self.refusal is not None and role != "assistant":
            raise PydanticCustomError("invalid_value", "only assistant messages have a refusal",
                                      {"field": "refusal"})
        if self.content is None and role == "function":
            self.content = ""  # OpenAI's function message may have null content
        if self.content is None:
            if role != "assistant" or not (self.tool_calls or self.function_call
                                           or self.refusal is not None):
                raise PydanticCustomError("missing_field", "missing required parameter",
                                          {"field": "content"})
        else:
            try:
                self.content = _text(self.content, ("text", "refusal") if role == "assistant"
                                     else ("text",))
            except PydanticCustomError as exc:
                raise PydanticCustomError(exc.type, exc.message(),
                                          {**(exc.context or {}), "field": "content"}) from None
        return self

    def wire(self, call_id: str = "") -> dict[str, Any]:
        """The message as backends get it: OpenAI's shape, text content as one string; a
        legacy ``function_call`` is the tool call ``call_id`` and a ``function`` message the
        tool message answering it."""
        if self.role == "function":
            return {"role": "tool", "content": self.content, "tool_call_id": call_id}
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.function_call is not None:
            out["tool_calls"] = [{"id": call_id, "type": "function",
                                  "function": self.function_call.model_dump()}]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.refusal is not None:
            out["refusal"] = self.refusal
        return out


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False
    include_obfuscation: bool | None = None


class FunctionDef(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=_FUNCTION_NAME)
    description: str | None = Field(None, max_length=8192)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(BaseModel):
    model_config = _STRICT
    type: str = Field("function", json_schema_extra={"enum": ["function"]})
    function: FunctionDef | None = None
    custom: Any = Field(None, json_schema_extra=_NULL_ONLY)

    @field_validator("type")
    @classmethod
    def _type(cls, kind: str) -> str:
        if kind != "function":
            raise _refused(f"tools of type '{kind}' are not supported; use 'function' tools")
        return kind

    @model_validator(mode="after")
    def _function(self) -> ToolParam:
        if self.function is None:
            raise PydanticCustomError("missing_field", "missing required parameter",
                                      {"field": "function"})
        return self


class _Sampling(BaseModel):
    """Fields shared by chat and plain completions."""

    model_config = _STRICT
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    n: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = Field(None, json_schema_extra={
        "maxProperties": 300, "propertyNames": {"pattern": "^[0-9]{1,10}$"},
        "additionalProperties": {"type": "integer", "minimum": -100, "maximum": 100}})

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise PydanticCustomError("invalid_value", "stop takes up to 4 non-empty strings "
                                      "of at most {most} characters", {"most": MAX_STOP_CHARS})
        return stops

    @field_validator("n")
    @classmethod
    def _n(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise _refused("only n=1 is supported")
        return n

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias: dict[str, int] | None) -> dict[str, int] | None:
        if bias is None:
            return None
        if len(bias) > 300 or any(not k.isdigit() or len(k) > 10 or not -100 <= v <= 100
                                  for k, v in bias.items()):
            raise PydanticCustomError("invalid_value", "logit_bias maps at most 300 token ids "
                                      "to values from -100 to 100")
        return bias

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def problems(self) -> list[tuple[str, str]]:
        """Mistakes across fields, as ``(param, message)``: each one a 400."""
        out = []
        if self.stream_options is not None and not self.stream:
            out.append(("stream_options", "stream_options is only allowed when stream is true"))
        return out

    def dropped_params(self) -> list[str]:
        """Fields the table drops on every backend that the request gives."""
        out = []
        for name in self.model_fields_set:
            if getattr(self, name) is None:
                continue
            try:
                kind = fields.rule(name, self.endpoint).handling
            except KeyError:
                continue
            if kind == "drop":
                out.append(name)
        options = self.stream_options
        if options is not None and options.include_obfuscation is not None:
            out.append("stream_options.include_obfuscation")
        return sorted(out)

    endpoint: ClassVar[fields.Endpoint] = "chat"

    def _extra(self) -> dict[str, Any]:
        """The pass-through fields given, for HTTP upstreams."""
        return {name: value for name in sorted(self.model_fields_set)
                if name in fields.EXTRA_FIELDS and (value := getattr(self, name)) is not None}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    tools: list[ToolParam] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: Any = Field(None, json_schema_extra={"anyOf": [
        {"type": "null"}, {"enum": ["none", "auto"]},
        {"type": "object", "required": ["type", "function"], "properties": {
            "type": {"const": "function"}, "function": {
                "type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}},
        {"type": "object", "required": ["type", "allowed_tools"], "properties": {
            "type": {"const": "allowed_tools"}, "allowed_tools": {"type": "object"}}}]})
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = Field(None, json_schema_extra={"anyOf": [
        {"type": "null"},
        {"type": "object", "required": ["type"], "additionalProperties": False,
         "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "json_schema"], "additionalProperties": False,
         "properties": {"type": {"const": "json_schema"}, "json_schema": {
             "type": "object", "required": ["name"], "additionalProperties": False,
             "properties": {"name": {"type": "string", "pattern": _FUNCTION_NAME},
                            "schema": {"type": "object"}, "strict": {"type": "boolean"},
                            "description": {"type": "string"}}}}}]})
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=1024)
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    # Refused unless null (the table's ``refuse``): the schema says so.
    audio: Any = Field(None, json_schema_extra=_NULL_ONLY)
    prediction: Any = Field(None, json_schema_extra=_NULL_ONLY)
    web_search_options: Any = Field(None, json_schema_extra=_NULL_ONLY)
    #: The legacy function-calling API (deprecated by OpenAI for ``tools``, still served):
    #: read as function tools, the answer's call given back as ``message.function_call``.
    functions: list[FunctionDef] | None = Field(None, min_length=1, max_length=128)
    function_call: Literal["none", "auto"] | NamedFunctionParam | None = None
    moderation: Any = Field(None, json_schema_extra=_NULL_ONLY)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, meta: dict[str, str] | None) -> dict[str, str] | None:
        if meta is not None and (len(meta) > 16 or any(len(k) > 64 or len(v) > 512
                                                       for k, v in meta.items())):
            raise PydanticCustomError("invalid_value", "metadata takes at most 16 pairs, keys of "
                                      "at most 64 characters and values of at most 512")
        return meta

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and "audio" in value:
            raise _refused("audio output is not supported; only 'text'")
        return value

    @field_validator("audio", "prediction", "web_search_options", "moderation")
    @classmethod
    def _refuse(cls, value: Any, info: Any) -> None:
        if value is not None:
            why = {"audio": "audio output is not supported",
                   "prediction": "predicted outputs are not supported",
                   "web_search_options": "web search is not supported",
                   "moderation": "moderation is not supported"}[info.field_name]
            raise _refused(why)

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        if set(value) - {"type", "json_schema"}:
            raise PydanticCustomError("invalid_value", "response_format takes 'type' and "
                                      "'json_schema' only")
        try:
            fmt = fields.response_format_from_openai(value)
        except InvalidRequest as exc:
            raise PydanticCustomError("invalid_value", "{why}", {"why": exc.message.split(": ", 1)[-1]}) from None
        if fmt is not None and fmt.type == "json_schema":
            spec = value["json_schema"]
            if set(spec) - {"name", "schema", "strict", "description"}:
                raise PydanticCustomError("invalid_value", "response_format.json_schema takes "
                                          "name, schema, strict and description")
            import re

            if not re.fullmatch(_FUNCTION_NAME[1:-1], spec["name"]):
                raise PydanticCustomError("invalid_value", "response_format.json_schema.name must "
                                          "be 1-64 letters, digits, '_' or '-'")
        elif "json_schema" in value:
            raise PydanticCustomError("invalid_value", "json_schema is only given with type "
                                      "'json_schema'")
        return value

    def problems(self) -> list[tuple[str, str]]:
        out = super().problems()
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            out.append(("max_tokens", "give max_completion_tokens or max_tokens, not two "
                                      "different values"))
        if self.top_logprobs is not None and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        if self.functions is not None and (self.tools or self.tool_choice is not None):
            out.append(("functions", "give tools (and tool_choice) or the legacy functions "
                                     "(and function_call), not both"))
        elif self.function_call is not None and self.functions is None:
            out.append(("function_call", "function_call needs functions"))
        else:
            try:
                self._tools()
            except InvalidRequest as exc:
                out.append((exc.param or "tools", exc.message.split(": ", 1)[-1]))
        out += self._function_messages()
        return out

    @property
    def legacy_functions(self) -> bool:
        """The request calls functions the legacy way: its answer's call is given back so."""
        return self.functions is not None

    def _tools(self) -> tuple[Any, Any]:
        if self.functions is not None:
            choice = self.function_call
            return fields.tool_choice_and_tools(
                {"type": "function", "function": choice.model_dump()}
                if isinstance(choice, NamedFunctionParam) else choice,
                fields.tools_from_openai([{"type": "function",
                                           "function": f.model_dump(exclude_none=True)}
                                          for f in self.functions], "functions"),
                "function_call")
        tools = fields.tools_from_openai([t.model_dump(exclude_none=True, exclude={"custom"})
                                          for t in self.tools] if self.tools else None)
        return fields.tool_choice_and_tools(self.tool_choice, tools)

    def _messages(self) -> list[dict[str, Any]]:
        """The messages as backends get them; a legacy function call and the ``function``
        message answering it share an id: ``fn`` and the call's message index in 7 digits
        (9 letters and digits, which every upstream's tool-call ids allow)."""
        out, last = [], ""
        for i, m in enumerate(self.messages):
            if m.function_call is not None:
                last = f"fn{i:07d}"
            out.append(m.wire(last))
        return out

    def _function_messages(self) -> list[tuple[str, str]]:
        """A ``function`` message answers the assistant ``function_call`` right before it,
        of the function it names."""
        out = []
        for i, m in enumerate(self.messages):
            if m.role != "function":
                continue
            before = self.messages[i - 1] if i else None
            called = before.function_call if before is not None else None
            if called is None:
                out.append((f"messages[{i}]", "a function message answers the assistant "
                                              "message with a function_call right before it"))
            elif called.name != m.name:
                out.append((f"messages[{i}].name", f"the function called before it is "
                                                   f"'{called.name}'"))
        return out

    def dropped_params(self) -> list[str]:
        out = super().dropped_params()
        out += [f"messages[{i}].{name}" for i, m in enumerate(self.messages)
                for name in CLIENT_MESSAGE_FIELDS if getattr(m, name) is not None]
        if not self.tools:  # nothing to choose from
            if self.tool_choice in ("none", "auto"):
                out.append("tool_choice")
            if self.parallel_tool_calls is not None and not (
                    self.functions is not None and self.parallel_tool_calls is False):
                out.append("parallel_tool_calls")  # legacy functions: one call per answer
        return sorted(out)

    def to_generation(self, model: str, request_id: str) -> GenerationRequest:
        choice, tools = self._tools()
        return GenerationRequest(
            model=model,
            messages=self._messages(),
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, stop=self.stop,  # type: ignore[arg-type]
            seed=self.seed, user=self.user, request_id=request_id,
            tools=tools, tool_choice=choice if tools else None,
            parallel_tool_calls=(False if self.legacy_functions else self.parallel_tool_calls)
            if tools else None,
            response_format=fields.response_format_from_openai(self.response_format),
            logprobs=bool(self.logprobs), top_logprobs=self.top_logprobs if self.logprobs else None,
            extra=self._extra(),
        )


class CompletionRequest(_Sampling):
    endpoint: ClassVar[fields.Endpoint] = "completions"
    #: One string; the document says what :meth:`_one_prompt` takes too (a list of one).
    prompt: Annotated[str, WithJsonSchema({"anyOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "maxItems": 1, "items": {"type": "string"}}]})]
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_CAP)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    echo: bool | None = None
    #: Fill in the middle: the answer goes between ``prompt`` and this.
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        """OpenAI's ``prompt`` may be a list (a batch: one choice per prompt), and clients
        send one prompt as a list of one (LangChain's ``OpenAI`` LLM always does): that is
        taken. A batch of several, or token ids, is refused by name."""
        if not isinstance(value, list):
            return value
        if value and all(isinstance(p, (int, list)) for p in value):
            raise _refused("token-id prompts are not supported: send the prompt as text")
        if len(value) == 1:
            return value[0]
        if not value:
            raise PydanticCustomError("invalid_value", "the list of prompts is empty")
        raise _refused(f"one prompt per request: this one has {len(value)} (a list of prompts "
                       "asks for one choice each, which is not supported); send them as "
                       "separate requests")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise _refused("only best_of=1 is supported")
        return value

    @field_validator("echo")
    @classmethod
    def _echo(cls, value: bool | None) -> bool | None:
        if value:
            raise _refused("echo is not supported")
        return value

    def to_generation(self, model: str, request_id: str) -> GenerationRequest:
        return GenerationRequest(
            model=model, prompt=self.prompt, suffix=self.suffix, max_tokens=self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, stop=self.stop,  # type: ignore[arg-type]
            seed=self.seed, user=self.user, request_id=request_id,
            logprobs=self.logprobs is not None, top_logprobs=self.logprobs,
            extra=self._extra(),
        )


def _param(loc: tuple[Any, ...]) -> str | None:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _problem(err: ErrorDetails) -> tuple[str | None, str, str]:
    """One pydantic error as ``(param, message, code)``."""
    kind = err["type"]
    ctx = err.get("ctx") or {}
    param = _param(tuple(err["loc"]))
    if ctx.get("field"):
        param = f"{param}.{ctx['field']}" if param else str(ctx["field"])
    param = param or ctx.get("param")
    if kind == "extra_forbidden":
        return param, f"unsupported parameter: '{param}' is not supported by joulegate", \
            "unsupported_parameter"
    if kind in ("missing", "missing_field"):
        return param, f"missing required parameter: '{param}'", "missing_required_parameter"
    if kind in ("unsupported_value", "unsupported_content", "unsupported_role"):
        return param, f"invalid value for '{param}': {err['msg']}", "unsupported_value"
    if kind.endswith(("_type", "_parsing")) or kind == "invalid_type":
        got = err.get("input")
        return param, (f"invalid type for '{param}': {err['msg'].lower()} "
                       f"(got {type(got).__name__})"), "invalid_type"
    return param, f"invalid value for '{param}': {err['msg'][:1].lower()}{err['msg'][1:]}", \
        "invalid_value"


def _refusal(problems: list[tuple[str | None, str, str]]) -> InvalidRequest:
    """One 400 for every problem: the message lists them all, ``param`` is the first."""
    param, message, code = problems[0]
    if len(problems) > 1:
        message = f"{len(problems)} invalid parameters: " + "; ".join(m for _, m, _ in problems)
    err = InvalidRequest(message, param=param, code=code)
    err.rejected_params = tuple(dict.fromkeys(p for p, _, _ in problems if p))
    return err


def _droppable_in(body: bytes, endpoint: fields.Endpoint) -> list[str]:
    """The fields the table drops that a body (which failed validation) gives."""
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(raw, dict):
        return []
    out = []
    for name, value in raw.items():
        try:
            if value is not None and fields.rule(name, endpoint).handling == "drop":
                out.append(name)
        except KeyError:
            pass
    return out


def parse_request(model_cls: type[_Sampling], body: bytes,
                  unsupported: Literal["drop", "reject"] = "drop") -> Any:
    """Parse ``body`` as ``model_cls`` or raise one :class:`InvalidRequest` naming every
    invalid field (and, with ``unsupported="reject"``, every field the table would drop)."""
    endpoint: fields.Endpoint | None = getattr(model_cls, "endpoint", None)
    try:
        req = model_cls.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None
        if first["type"] in ("model_type", "model_attributes_type") and not first["loc"]:
            raise InvalidRequest("the request body must be a JSON object",
                                 code="invalid_json") from None
        problems = [_problem(e) for e in errors]
        if unsupported == "reject" and endpoint is not None:
            problems += [_unsupported(name) for name in _droppable_in(body, endpoint)]
        raise _refusal(problems) from None
    if not isinstance(req, _Sampling):
        return req
    found: list[tuple[str | None, str, str]] = [(p, f"invalid value for '{p}': {m}", "invalid_value")
                                                for p, m in req.problems()]
    if unsupported == "reject":
        found += [_unsupported(name) for name in req.dropped_params()]
    if found:
        raise _refusal(found)
    return req


def refuse_drops(dropped: list[str], unsupported: str) -> None:
    """For a tenant whose ``unsupported_params`` is ``reject``: one 400 naming every field
    the request gives that the gateway would drop (the Responses API's; chat's are in
    :func:`parse_request`)."""
    if dropped and unsupported == "reject":
        raise _refusal([_unsupported(name) for name in dropped])


def _unsupported(name: str) -> tuple[str, str, str]:
    return name, (f"unsupported parameter: '{name}' is not used by this gateway, and your "
                  "policy's unsupported_params is 'reject'"), "unsupported_parameter"


# -- responses ---------------------------------------------------------------------------

def usage_dict(prompt_tokens: int, completion_tokens: int,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if extra:
        usage.update(extra)
    return usage


def spelled(entries: list[TokenLogprob] | None, text: str) -> list[TokenLogprob]:
    """Of a text that a tool call followed, the entries of the tokens that wrote ``text``:
    OpenAI gives log-probabilities of the answer's text only, and some backends (llama.cpp)
    score the call's tokens too. A token is the text's when its first byte falls within
    it; whitespace-only tokens before a text they were stripped from are not."""
    out: list[TokenLogprob] = []
    size, at = len(text.encode()), 0
    stripped = not text[:1].isspace()
    for e in entries or ():
        raw = e.token.encode() if e.bytes is None else bytes(e.bytes)
        if stripped and not out and raw.isspace():
            continue
        if at >= size:
            break
        out.append(e)
        at += len(raw)
    return out


def answer_logprobs(entries: list[TokenLogprob] | None, text: str,
                    calls: list[ToolCall] | None) -> list[TokenLogprob] | None:
    """A whole answer's log-probabilities as the client gets them: of its text alone when
    it made tool calls (:func:`spelled`), else as the backend gave them (the bytes of an
    HTTP upstream's tokens may not add up to the text: vLLM reports a token that holds part
    of a character as U+FFFD)."""
    if entries is None or not calls:
        return entries
    return spelled(entries, text)


class TextLogprobs:
    """Which of a streamed chunk's log-probabilities go out with its text. Entries ride
    with text; those of a chunk with no text wait for the text that follows (a backend
    holding a possible stop sequence or call opening back sends the entries first); a tool
    call's chunk keeps only those that wrote its own text (:func:`spelled`) and drops the
    rest: the call's tokens."""

    def __init__(self) -> None:
        self.pending: list[TokenLogprob] = []

    def take(self, chunk: Chunk) -> list[TokenLogprob]:
        entries = self.pending + list(chunk.logprobs or ())
        self.pending = []
        if chunk.tool_calls:
            return spelled(entries, chunk.text)
        if not chunk.text:
            self.pending = entries
            return []
        return entries


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """``choices[i].logprobs`` of a chat answer or chunk."""
    if entries is None:
        return None
    return {"content": [e.to_openai() for e in entries], "refusal": None}


def text_logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    """``choices[i].logprobs`` of a legacy completion: parallel lists of tokens, their
    log-probabilities, the alternatives (token → log-probability) and text offsets."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top_logprobs} for e in entries],
            "text_offset": offsets}


def chat_completion(rid: str, created: int, model: str, text: str, finish: str,
                    usage: dict[str, Any], tool_calls: list[ToolCall] | None = None,
                    logprobs: list[TokenLogprob] | None = None,
                    functions: bool = False) -> dict[str, Any]:
    """A whole chat answer; with ``functions`` (the legacy API) its one call is
    ``message.function_call`` and the finish reason ``function_call``."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["content"] = text or None
        if functions:
            message["function_call"] = {"name": tool_calls[0].name,
                                        "arguments": tool_calls[0].arguments}
        else:
            message["tool_calls"] = [c.to_openai() for c in tool_calls]
    if functions:
        finish = legacy_finish(finish)
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message,
                     "logprobs": chat_logprobs(logprobs), "finish_reason": finish}],
        "usage": usage,
    }


def legacy_finish(finish: str) -> str:
    """The legacy ``functions`` API's finish reason for a call."""
    return "function_call" if finish == "tool_calls" else finish


def function_call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    """A streamed call's piece as the legacy ``delta.function_call``."""
    out: dict[str, Any] = {"arguments": delta.arguments}
    if delta.name:
        out["name"] = delta.name
    return out


def text_completion(rid: str, created: int, model: str, text: str, finish: str,
                    usage: dict[str, Any], logprobs: list[TokenLogprob] | None = None
                    ) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": text_logprobs(logprobs),
                     "finish_reason": finish}],
        "usage": usage,
    }


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, Any],
               finish: str | None, logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": chat_logprobs(logprobs),
                         "finish_reason": finish}]}


def text_chunk(rid: str, created: int, model: str, text: str,
               finish: str | None, logprobs: list[TokenLogprob] | None = None,
               offset: int = 0) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": text_logprobs(logprobs, offset),
                         "finish_reason": finish}]}


def usage_chunk(rid: str, created: int, model: str, chat: bool,
                usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage}

"""The OpenAI wire format: validated requests in, response dictionaries out.

Requests are parsed straight from the body bytes by pydantic in strict mode, so a wrong
type is an error rather than a coercion, and any field this gateway does not implement
(``tools``, ``n`` > 1, image parts, ``logprobs``, ...) is a 400 that names it instead of
being silently ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from backends.base import GenerationRequest

from .errors import InvalidRequest

# No NaN or Infinity: JSON has neither, and no backend samples with them.
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
#: Bounds of the numeric fields, to what every backend accepts: a seed is a signed 64-bit
#: integer upstream (vLLM, llama.cpp); a larger value passed validation and failed there.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1
MAX_TOKENS_CAP = 1 << 20
MAX_STOP_CHARS = 512
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: str
    content: Any
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, role: str) -> str:
        if role not in _ROLES:
            raise PydanticCustomError(
                "unsupported_role", "role '{role}' is not supported; use system, developer, user "
                "or assistant", {"role": role})
        return _ROLES[role]

    @field_validator("content")
    @classmethod
    def _content(cls, content: Any) -> str:
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise PydanticCustomError("invalid_type", "content must be a string or a list of "
                                      "text parts")
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                shown = kind if isinstance(kind, str) else type(part).__name__
                raise PydanticCustomError(
                    "unsupported_content", "content part of type '{kind}' is not supported; "
                    "only parts of type 'text' are", {"kind": shown})
            texts.append(part["text"])
        return "\n".join(texts)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by chat and plain completions."""

    model_config = _STRICT
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    n: int | None = None

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
            raise PydanticCustomError("unsupported_value", "only n=1 is supported")
        return n

    @model_validator(mode="after")
    def _stream_options(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError("invalid_value", "stream_options is only allowed when "
                                      "stream is true", {"param": "stream_options"})
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def dropped_params(self) -> list[str]:
        """Fields accepted but not passed on to the backend."""
        return []


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionRequest:
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise PydanticCustomError("invalid_value", "give max_completion_tokens or max_tokens, "
                                      "not two different values", {"param": "max_tokens"})
        return self

    def dropped_params(self) -> list[str]:
        """Fields accepted but not passed on to the backend: a message's ``name``."""
        return [f"messages[{i}].name" for i, m in enumerate(self.messages) if m.name is not None]

    def to_generation(self, model: str, request_id: str) -> GenerationRequest:
        return GenerationRequest(
            model=model,
            messages=[{"role": m.role, "content": m.content} for m in self.messages],
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, stop=self.stop,  # type: ignore[arg-type]
            seed=self.seed, user=self.user, request_id=request_id,
        )


class CompletionRequest(_Sampling):
    prompt: str
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_CAP)  # OpenAI's default for completions

    def to_generation(self, model: str, request_id: str) -> GenerationRequest:
        return GenerationRequest(
            model=model, prompt=self.prompt, max_tokens=self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, stop=self.stop,  # type: ignore[arg-type]
            seed=self.seed, user=self.user, request_id=request_id,
        )


def _param(loc: tuple[Any, ...]) -> str | None:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _invalid(err: ErrorDetails) -> InvalidRequest:
    kind = err["type"]
    param = _param(tuple(err["loc"])) or (err.get("ctx") or {}).get("param")
    if kind == "json_invalid":
        return InvalidRequest("the request body is not valid JSON", code="invalid_json")
    if kind in ("model_type", "model_attributes_type") and not err["loc"]:
        return InvalidRequest("the request body must be a JSON object", code="invalid_json")
    if kind == "extra_forbidden":
        return InvalidRequest(f"unsupported parameter: '{param}' is not supported by joulegate",
                              param=param, code="unsupported_parameter")
    if kind == "missing":
        return InvalidRequest(f"missing required parameter: '{param}'", param=param,
                              code="missing_required_parameter")
    if kind in ("unsupported_value", "unsupported_content", "unsupported_role"):
        return InvalidRequest(f"invalid value for '{param}': {err['msg']}", param=param,
                              code="unsupported_value")
    if kind.endswith(("_type", "_parsing")) or kind == "invalid_type":
        got = err.get("input")
        return InvalidRequest(f"invalid type for '{param}': {err['msg'].lower()} "
                              f"(got {type(got).__name__})", param=param, code="invalid_type")
    return InvalidRequest(f"invalid value for '{param}': {err['msg'][:1].lower()}{err['msg'][1:]}",
                          param=param, code="invalid_value")


def parse_request(model_cls: type[_Sampling], body: bytes) -> Any:
    """Parse ``body`` as ``model_cls`` or raise the :class:`InvalidRequest` for its first
    error, carrying the names of every unsupported field (for the access log)."""
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        err = _invalid(errors[0])
        err.rejected_params = tuple(p for e in errors if e["type"] == "extra_forbidden"
                                    and (p := _param(tuple(e["loc"]))))
        raise err from None


# -- responses ---------------------------------------------------------------------------

def usage_dict(prompt_tokens: int, completion_tokens: int,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    if extra:
        usage.update(extra)
    return usage


def chat_completion(rid: str, created: int, model: str, text: str, finish: str,
                    usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }


def text_completion(rid: str, created: int, model: str, text: str, finish: str,
                    usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, Any],
               finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def text_chunk(rid: str, created: int, model: str, text: str,
               finish: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, created: int, model: str, chat: bool,
                usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage}

"""The field policy: how every OpenAI request field of ``POST /v1/chat/completions`` and
``POST /v1/completions`` is handled, in one table (:data:`FIELDS`), and the translations of
the OpenAI tool, structured-output and log-probability fields into a backend request.

Each field is one of:

* ``gateway`` — the gateway itself uses it (``model``, ``stream``, ...);
* ``pass`` — forwarded as given to HTTP upstreams (``openai``, ``vllm`` kinds); an in-process
  backend (``llamacpp``) uses it when its column says ``used``, otherwise the field is
  *dropped* there (listed in ``X-Joulegate-Dropped-Params``);
* ``translate`` — rewritten into the backend request (``max_completion_tokens`` becomes
  ``max_tokens``; ``tools`` become :class:`~backends.features.ToolSpec`, ...);
* ``drop`` — safe to ignore: accepted, not passed on, listed in
  ``X-Joulegate-Dropped-Params`` and in the access log's ``dropped_params``;
* ``refuse`` — a 400 that says why (the gateway cannot honour it, and ignoring it would
  change the answer the client gets).

A tenant's ``unsupported_params: reject`` turns every drop into a 400. A field that needs
a capability (``tools``, ``structured_output``, ``logprobs``, ``insertion`` for a
``suffix``) routes the request only among
tiers whose backend kind has it (:mod:`gateway.capabilities`).

The translation functions take OpenAI's wire values (plain JSON) so that every endpoint
that speaks OpenAI's tool and format spelling shares them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from backends.base import GenerationRequest
from backends.features import (
    NamedToolChoice,
    ResponseFormat,
    ToolChoice,
    ToolSpec,
    tool_choice_from_openai,
)
from policies import Policy, TierSpec

from .capabilities import tier_capabilities
from .errors import InvalidRequest

Handling = Literal["gateway", "pass", "translate", "drop", "refuse"]
Endpoint = Literal["chat", "completions"]
BOTH: tuple[Endpoint, ...] = ("chat", "completions")
CHAT: tuple[Endpoint, ...] = ("chat",)
COMPLETIONS: tuple[Endpoint, ...] = ("completions",)


@dataclass(frozen=True, slots=True)
class FieldRule:
    """How one request field is handled."""

    name: str
    endpoints: tuple[Endpoint, ...]
    handling: Handling
    #: What an in-process backend does with a ``pass`` field: ``used`` or ``dropped``.
    local: Literal["used", "dropped", ""] = ""
    #: The backend capability the field needs (routing goes only to tiers that have it).
    capability: str | None = None
    note: str = ""


def _p(name: str, local: Literal["used", "dropped"], note: str = "",
       endpoints: tuple[Endpoint, ...] = BOTH) -> FieldRule:
    return FieldRule(name, endpoints, "pass", local, None, note)


#: Every field of OpenAI's chat and completions request bodies (openai-python's
#: ``completion_create_params``), and a message's fields. Anything else is refused as unknown.
FIELDS: tuple[FieldRule, ...] = (
    FieldRule("model", BOTH, "gateway", note="a tier, a model name or `auto`; the upstream gets the tier's model"),
    FieldRule("messages", CHAT, "translate",
              note="roles system, developer (sent as system), user, assistant (with `tool_calls`, "
                   "content null), tool (`tool_call_id`); the legacy assistant `function_call` "
                   "and `function` message as a tool call and its answer; text parts joined "
                   "into one string"),
    _p("messages[].name", "dropped", "kept on the message", CHAT),
    _p("messages[].refusal", "dropped", "an assistant's earlier refusal, kept on the message", CHAT),
    FieldRule("messages[].provider_specific_fields", CHAT, "drop",
              note="LiteLLM's own fields on a message it returned and the caller sends back"),
    FieldRule("messages[].reasoning_content", CHAT, "drop", note="likewise (LiteLLM)"),
    FieldRule("messages[].thinking_blocks", CHAT, "drop", note="likewise (LiteLLM)"),
    FieldRule("prompt", COMPLETIONS, "gateway",
              note="one string, or a list of one (LangChain's `OpenAI` LLM sends that); longer "
                   "lists and token ids are refused"),
    FieldRule("stream", BOTH, "gateway"),
    FieldRule("stream_options.include_usage", BOTH, "gateway", note="a final usage chunk with joules"),
    FieldRule("stream_options.include_obfuscation", BOTH, "drop", note="never obfuscated"),
    _p("max_tokens", "used", "1..2^20; a budget may lower it"),
    FieldRule("max_completion_tokens", CHAT, "translate",
              note="sent as `max_tokens`, or as itself to a backend with "
                   "`max_tokens_field: max_completion_tokens`"),
    _p("temperature", "used", "0..2"),
    _p("top_p", "used", "0..1"),
    _p("seed", "used", "signed 64-bit"),
    _p("stop", "used", "up to 4 strings of at most 512 characters"),
    FieldRule("n", BOTH, "refuse", note="above 1 (n = 1 is accepted)"),
    _p("frequency_penalty", "used", "-2..2; llama.cpp: over the tokens generated so far"),
    _p("presence_penalty", "used", "-2..2; llama.cpp: over the tokens generated so far"),
    _p("logit_bias", "dropped", "token id → -100..100, at most 300"),
    _p("user", "dropped", "at most 256 characters"),
    _p("metadata", "dropped", "at most 16 string pairs", CHAT),
    _p("safety_identifier", "dropped", "", CHAT),
    _p("prompt_cache_key", "dropped", "", CHAT),
    _p("prompt_cache_retention", "dropped", "", CHAT),
    _p("prompt_cache_options", "dropped", "", CHAT),
    _p("reasoning_effort", "dropped", "", CHAT),
    _p("verbosity", "dropped", "", CHAT),
    FieldRule("tools", CHAT, "translate", capability="tools",
              note="function tools, at most 128; custom tools are refused"),
    FieldRule("tool_choice", CHAT, "translate", capability="tools",
              note="`none`, `auto`, `required`, a named function, or `allowed_tools` (narrows "
                   "`tools`); without tools, `none`/`auto` are dropped"),
    FieldRule("parallel_tool_calls", CHAT, "translate", capability="tools",
              note="dropped without tools"),
    FieldRule("functions", CHAT, "translate", capability="tools",
              note="the legacy API, as function tools; the call comes back as "
                   "`message.function_call`, finish reason `function_call`; not with `tools`"),
    FieldRule("function_call", CHAT, "translate", capability="tools",
              note="`none`, `auto` or `{\"name\": ...}`, with `functions`"),
    FieldRule("response_format", CHAT, "translate", capability="structured_output",
              note="`text` needs nothing; `json_object` and `json_schema` (strict) need the capability"),
    FieldRule("logprobs", CHAT, "translate", capability="logprobs",
              note="`choices[].logprobs.content`: the text's tokens, not a tool call's"),
    FieldRule("top_logprobs", CHAT, "translate", capability="logprobs",
              note="0..20, with `logprobs: true`"),
    FieldRule("logprobs", COMPLETIONS, "translate", capability="logprobs",
              note="0..5 alternatives; the legacy `tokens`/`token_logprobs` shape"),
    FieldRule("store", CHAT, "drop", note="the gateway keeps no completions"),
    FieldRule("service_tier", CHAT, "drop", note="tiers are the gateway's own"),
    FieldRule("modalities", CHAT, "drop", note="`[\"text\"]`; with `audio` it is refused"),
    FieldRule("audio", CHAT, "refuse", note="no audio output"),
    FieldRule("prediction", CHAT, "refuse", note="no predicted outputs"),
    FieldRule("web_search_options", CHAT, "refuse", note="no web search"),
    FieldRule("moderation", CHAT, "refuse", note="no moderation"),
    FieldRule("best_of", COMPLETIONS, "refuse", note="above 1 (1 is accepted)"),
    FieldRule("echo", COMPLETIONS, "refuse", note="when true"),
    FieldRule("suffix", COMPLETIONS, "translate", capability="insertion",
              note="fill in the middle: the answer goes between `prompt` and it (llama.cpp: "
                   "the model's FIM tokens, as Qwen2.5-Coder's; a model without them refuses)"),
    FieldRule("messages[].content image_url / input_audio / file parts", CHAT, "refuse",
              note="text only"),
)


def rule(name: str, endpoint: Endpoint) -> FieldRule:
    """The rule of field ``name`` (its table spelling) on ``endpoint``."""
    for r in FIELDS:
        if r.name == name and endpoint in r.endpoints:
            return r
    raise KeyError(name)


#: ``pass`` fields an in-process backend drops, by name (top-level fields only).
LOCAL_DROPS = frozenset(r.name for r in FIELDS if r.handling == "pass" and r.local == "dropped"
                        and "[" not in r.name)
#: Top-level ``pass`` fields that travel in :attr:`GenerationRequest.extra`.
EXTRA_FIELDS = frozenset(r.name for r in FIELDS if r.handling == "pass"
                         and "[" not in r.name) - {"max_tokens", "temperature", "top_p", "seed",
                                                   "stop", "user"}


def markdown_table() -> str:
    """:data:`FIELDS` as the README's table."""
    says = {"gateway": "used by the gateway", "translate": "translated", "drop": "dropped",
            "refuse": "refused (400)"}
    lines = ["| field | endpoints | handling | llama.cpp | needs | notes |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in FIELDS:
        how = "forwarded" if r.handling == "pass" else says[r.handling]
        local = r.local if r.handling == "pass" else ""
        lines.append(f"| `{r.name}` | {', '.join(r.endpoints)} | {how} | {local} | "
                     f"{r.capability or ''} | {r.note} |")
    return "\n".join(lines)


# -- translations -------------------------------------------------------------------------


def tools_from_openai(tools: Sequence[Any] | None, param: str = "tools") -> list[ToolSpec] | None:
    """OpenAI ``tools`` (function tools) → the backend's :class:`ToolSpec` list."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        try:
            out.append(ToolSpec.from_openai(tool))
        except ValueError as exc:
            raise InvalidRequest(f"invalid value for '{param}[{i}]': {exc}", param=f"{param}[{i}]",
                                 code="invalid_value") from None
    names = [t.name for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise InvalidRequest(f"invalid value for '{param}': function '{dup}' is given twice",
                             param=param, code="invalid_value")
    return out


def tool_choice_and_tools(choice: Any, tools: list[ToolSpec] | None, param: str = "tool_choice"
                          ) -> tuple[ToolChoice | None, list[ToolSpec] | None]:
    """OpenAI ``tool_choice`` with the request's tools → (choice, tools). ``allowed_tools``
    narrows the tools to those it names and becomes its ``mode``. Raises
    :class:`InvalidRequest` for a choice that cannot be met."""
    if choice is None:
        return None, tools
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools")
        mode = allowed.get("mode") if isinstance(allowed, dict) else None
        listed = allowed.get("tools") if isinstance(allowed, dict) else None
        if mode not in ("auto", "required") or not isinstance(listed, list):
            raise InvalidRequest(f"invalid value for '{param}': allowed_tools needs a mode "
                                 "('auto' or 'required') and a list of tools", param=param,
                                 code="invalid_value")
        names = {(t.get("function") or {}).get("name") for t in listed if isinstance(t, dict)}
        unknown = sorted(str(n) for n in names if n not in {t.name for t in tools or ()})
        if unknown:
            raise InvalidRequest(f"invalid value for '{param}': allowed_tools names "
                                 f"{', '.join(repr(n) for n in unknown)}, not among the tools",
                                 param=param, code="invalid_value")
        kept = [t for t in tools or () if t.name in names]
        return mode, kept or None
    try:
        parsed = tool_choice_from_openai(choice)
    except ValueError as exc:
        raise InvalidRequest(f"invalid value for '{param}': {exc}", param=param,
                             code="invalid_value") from None
    if isinstance(parsed, NamedToolChoice) and parsed.name not in {t.name for t in tools or ()}:
        raise InvalidRequest(f"invalid value for '{param}': function '{parsed.name}' is not "
                             "among the tools", param=param, code="invalid_value")
    if parsed == "required" and not tools:
        raise InvalidRequest(f"invalid value for '{param}': 'required' needs tools", param=param,
                             code="invalid_value")
    return parsed, tools


def response_format_from_openai(value: Any, param: str = "response_format"
                                ) -> ResponseFormat | None:
    """OpenAI ``response_format`` → :class:`ResponseFormat`; ``None`` when absent."""
    if value is None:
        return None
    try:
        return ResponseFormat.from_openai(value)
    except ValueError as exc:
        raise InvalidRequest(f"invalid value for '{param}': {exc}", param=param,
                             code="invalid_value") from None


def needed_capabilities(req: GenerationRequest) -> tuple[str, ...]:
    """The backend capabilities ``req`` needs beyond generation."""
    needs = []
    if req.tools:
        needs.append("tools")
    if req.response_format is not None and req.response_format.type != "text":
        needs.append("structured_output")
    if req.logprobs:
        needs.append("logprobs")
    if req.suffix is not None:
        needs.append("insertion")
    return tuple(needs)


def local_drops(req: GenerationRequest) -> list[str]:
    """What an in-process backend does not use of ``req``: its pass-through fields and the
    messages' ``name``/``refusal``."""
    out = sorted(k for k in req.extra if k in LOCAL_DROPS)
    if req.user is not None:
        out.append("user")
    for i, message in enumerate(req.messages or ()):
        out.extend(f"messages[{i}].{k}" for k in ("name", "refusal")
                   if message.get(k) is not None)
    return out


def joined(params: Iterable[str]) -> str:
    return ", ".join(f"'{p}'" for p in params)


def on_tier(policy: Policy, tenant: str, tier: TierSpec, req: GenerationRequest,
            dropped: list[str]) -> list[str]:
    """``tier`` is about to serve ``req``, whose dropped parameters so far are ``dropped``:
    the dropped parameters on this tier. On an in-process tier, the pass-through fields it
    does not use join them, or, for a tenant whose ``unsupported_params`` is ``reject``,
    the request is refused with a 400 naming them."""
    unused = local_drops(req)
    kept = [p for p in dropped if p not in unused]
    drops = unused if tier_capabilities(policy, tier).local else []
    if drops and policy.tenants[tenant].unsupported_params == "reject":
        err = InvalidRequest(
            f"unsupported parameter{'s' if len(drops) > 1 else ''}: {joined(drops)} "
            f"{'are' if len(drops) > 1 else 'is'} not used by tier '{tier.name}', "
            "and your policy's unsupported_params is 'reject'", param=drops[0],
            code="unsupported_parameter")
        err.rejected_params = tuple(drops)
        raise err
    return sorted({*kept, *drops})

"""Tools, structured output and log-probabilities for the in-process llama.cpp backend.

:func:`plan_request` decides once per request what the model sees (messages, the tools its
chat template renders) and how decoding is constrained (a GBNF grammar); :func:`shape_answer`
and :class:`StreamShaper` turn the model's text into the request's answer: content, tool
calls, checked JSON. :class:`LogprobRecorder` collects each generated token's
log-probability from inside llama.cpp's sampler chain (llama-cpp-python's own ``logprobs``
needs every context loaded with ``logits_all``, which costs n_ctx times vocabulary-size floats per
slot and computes the output layer for every prompt token).

Everything here works on text and plain values, so it is tested without a model.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from .base import (
    BackendInvalidOutput,
    BackendRejected,
    Chunk,
    FeatureUnsupported,
    GenerationRequest,
)
from .features import (
    NamedToolChoice,
    ResponseFormat,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    TopLogprob,
)
from .structured import GrammarError, build_grammar, schema_errors
from .tool_calls import (
    HermesStreamParser,
    ToolCallError,
    hermes_messages,
    parse_hermes,
    template_messages,
)

#: OpenAI's ceiling on ``top_logprobs``.
MAX_TOP_LOGPROBS = 20


@dataclass(slots=True)
class RequestPlan:
    """How one request runs on llama.cpp."""

    #: Chat messages as the chat template gets them (``None``: plain completion).
    messages: list[dict[str, Any]] | None = None
    #: ``tools`` for the chat template (OpenAI shape), when it renders them itself.
    template_tools: list[dict[str, Any]] | None = None
    #: The functions the answer is parsed for; ``None``: the answer is plain text.
    tools: list[ToolSpec] | None = None
    #: The answer must be a call (``tool_choice`` ``required`` or named).
    force_call: bool = False
    parallel: bool = True
    #: The answer (when it is not a call) must be JSON of this format.
    response: ResponseFormat | None = None
    grammar: str | None = None
    #: Alternatives per token to report; ``None``: no log-probabilities.
    top_logprobs: int | None = None


#: A model's fill-in-the-middle tokens: (prefix, suffix, middle) ids, -1 where it has none
#: (llama.cpp's ``llama_vocab_fim_pre/suf/mid``).
FimTokens = tuple[int, int, int]


def insertion_prompt(fim: FimTokens, prefix: list[int], suffix: list[int],
                     bos: int | None = None) -> list[int]:
    """The prompt of a fill-in-the-middle request: the prefix and the suffix marked by the
    model's own tokens, in the order code models are trained on (prefix, suffix, middle:
    Qwen2.5-Coder's ``<|fim_prefix|>...<|fim_suffix|>...<|fim_middle|>``); what the model
    writes next is the middle. ``bos`` first for a model that wants one."""
    pre, suf, mid = fim
    return [*([bos] if bos is not None else []), pre, *prefix, suf, *suffix, mid]


def plan_request(req: GenerationRequest, *, template_renders_tools: bool,
                 fim: FimTokens = (-1, -1, -1)) -> RequestPlan:
    """Check the request's tool and format fields and work out the plan; an impossible
    request raises :class:`BackendRejected` naming the parameter. ``fim``: the model's
    fill-in-the-middle tokens, which a ``suffix`` needs (without them:
    :class:`FeatureUnsupported`, which another tier may serve)."""
    if req.suffix is not None and min(fim) < 0:
        raise FeatureUnsupported("this tier's model has no fill-in-the-middle tokens, so it "
                                 "cannot answer a request with a 'suffix'", param="suffix")
    plan = RequestPlan(parallel=req.parallel_tool_calls is not False,
                       top_logprobs=(min(max(req.top_logprobs or 0, 0), MAX_TOP_LOGPROBS)
                                     if req.logprobs else None))
    tools = list(req.tools or [])
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    if tools and not req.is_chat:
        raise BackendRejected("tools need a chat request (messages)", param="tools")
    if choice in ("required",) or isinstance(choice, NamedToolChoice):
        if not tools:
            raise BackendRejected("tool_choice asks for a tool call but no tools were given",
                                  param="tool_choice")
        plan.force_call = True
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.name == choice.name]
        if not named:
            raise BackendRejected(f"tool_choice names function '{choice.name}', which is not "
                                  "among the tools", param="tool_choice")
        active = named
    else:
        active = tools if choice != "none" else []
    if req.response_format is not None and req.response_format.type != "text":
        plan.response = req.response_format
    try:
        plan.grammar = build_grammar(tools=active, force_call=plan.force_call,
                                     parallel=plan.parallel, response=plan.response)
    except GrammarError as exc:
        param = "response_format" if "response_format" in str(exc) else "tools"
        raise BackendRejected(str(exc), param=param) from None
    if active:
        # The template shows every offered tool (a named choice only narrows the grammar).
        plan.tools = active
    if req.messages is not None:
        shown = tools if choice != "none" else []
        if template_renders_tools:
            plan.messages = template_messages(req.messages)
            plan.template_tools = [t.to_openai() for t in shown] or None
        else:
            plan.messages = hermes_messages(req.messages, shown)
    return plan


# -- answers --------------------------------------------------------------------------------


def check_json(plan: RequestPlan, text: str, finish: str) -> None:
    """Raise :class:`BackendInvalidOutput` unless ``text`` is JSON of the plan's format. An
    answer cut off by ``max_tokens`` is let through as it is: OpenAI returns it so, with
    ``finish_reason`` "length" (its JSON mode guide says to check that before parsing; the
    SDK's ``parse`` raises ``LengthFinishReasonError``). The client asked for that many
    tokens; a 5xx would make SDKs send it again, for the same cut answer each time."""
    fmt = plan.response
    if fmt is None or finish == "length":
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BackendInvalidOutput(f"the model's output is not valid JSON ({exc.msg})") from None
    if fmt.type == "json_object" and not isinstance(value, dict):
        raise BackendInvalidOutput("the model's output is JSON but not an object")
    if fmt.type == "json_schema" and fmt.schema:
        error = schema_errors(fmt.schema, value)
        if error:
            raise BackendInvalidOutput("the model's output does not match the response_format "
                                       f"schema: {error}")


def shape_answer(plan: RequestPlan, text: str, finish: str
                 ) -> tuple[str, list[ToolCall] | None, str]:
    """A whole answer → (content, tool calls or ``None``, finish reason)."""
    cut = finish == "length"
    if plan.tools:
        try:
            parsed = parse_hermes(text, plan.tools, parallel=plan.parallel, cut=cut)
        except ToolCallError as exc:
            raise BackendInvalidOutput(str(exc)) from None
        if parsed.calls:
            return parsed.content, parsed.calls, finish if cut else "tool_calls"
        if cut:
            return parsed.content, None, finish
        if plan.force_call:
            raise BackendInvalidOutput("the model made no tool call")
    check_json(plan, text, finish)
    return text, None, finish


def call_deltas(index: int, call: ToolCall) -> list[ToolCallDelta]:
    """A whole call as stream pieces: id and name first, then the arguments."""
    return [ToolCallDelta(index, call.id, call.name, ""), ToolCallDelta(index, arguments=call.arguments)]


@dataclass(slots=True)
class StreamShaper:
    """Turns a model's streamed text pieces into chunks for the request's plan: tool calls
    whole (never half a call, but for the last of an answer cut off by max_tokens, as
    OpenAI returns it), JSON checked at the end, log-probabilities attached to the
    chunk their tokens' text went out in."""

    plan: RequestPlan
    _parser: HermesStreamParser | None = None
    _text: list[str] = field(default_factory=list)
    _calls: int = 0
    _pending: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.plan.tools:
            self._parser = HermesStreamParser(self.plan.tools, parallel=self.plan.parallel)

    def feed(self, piece: str, logprobs: list[TokenLogprob] | None = None) -> list[Chunk]:
        if logprobs:
            self._pending.extend(logprobs)
        self._text.append(piece)
        if self._parser is None:
            return self._chunks(piece, [])
        try:
            out = self._parser.feed(piece)
        except ToolCallError as exc:
            raise BackendInvalidOutput(str(exc)) from None
        return self._chunks(out.text, out.calls)

    def finish(self, finish: str, logprobs: list[TokenLogprob] | None = None
               ) -> tuple[list[Chunk], str]:
        """The model stopped: the remaining chunks and the final finish reason (without the
        closing chunk, which the backend adds with usage)."""
        if logprobs:
            self._pending.extend(logprobs)
        chunks: list[Chunk] = []
        cut = finish == "length"
        if self._parser is not None:
            try:
                out = self._parser.finish(cut)
            except ToolCallError as exc:
                raise BackendInvalidOutput(str(exc)) from None
            chunks = self._chunks(out.text, out.calls)
            if self._calls or cut:
                return chunks + self._flush(), finish if cut else "tool_calls"
            if self.plan.force_call:
                raise BackendInvalidOutput("the model made no tool call")
        check_json(self.plan, "".join(self._text), finish)
        return chunks + self._flush(), finish

    def _chunks(self, text: str, calls: list[ToolCall]) -> list[Chunk]:
        chunks: list[Chunk] = []
        if text:
            chunks.append(Chunk(text=text, logprobs=self._take()))
        for call in calls:
            for delta in call_deltas(self._calls, call):
                chunks.append(Chunk(tool_calls=[delta], logprobs=self._take()))
            self._calls += 1
        return chunks

    def _take(self) -> list[TokenLogprob] | None:
        taken, self._pending = self._pending, []
        return taken or None

    def _flush(self) -> list[Chunk]:
        rest = self._take()
        return [Chunk(logprobs=rest)] if rest else []


# -- log-probabilities ----------------------------------------------------------------------


class LogprobRecorder:
    """Collects log-probabilities of generated tokens for one request.

    :meth:`observe` runs as a llama.cpp logits processor (first in the sampler chain, so it
    sees the model's raw logits for every vocabulary entry, before penalties, grammar and
    temperature, which is what OpenAI reports); :meth:`record` runs in the token loop once the
    sampled token is known. The event loop takes finished entries with :meth:`drain`.
    """

    def __init__(self, top: int, detokenize: Any) -> None:
        self.top = top
        self._detokenize = detokenize
        self._last: Any = None
        self._entries: list[TokenLogprob] = []
        self._taken = 0
        self._lock = threading.Lock()

    def observe(self, input_ids: Any, logits: Any) -> Any:
        import numpy as np

        values = np.asarray(logits, dtype=np.float64)
        peak = values.max()
        self._last = values - (peak + np.log(np.exp(values - peak).sum()))
        return logits

    def _piece(self, token: int) -> tuple[str, list[int]]:
        raw: bytes = self._detokenize([int(token)])
        return raw.decode("utf-8", errors="replace"), list(raw)

    def record(self, token: int) -> None:
        logprobs = self._last
        if logprobs is None:
            return
        self._last = None
        import numpy as np

        tops: list[TopLogprob] = []
        if self.top:
            best = np.argpartition(-logprobs, self.top)[:self.top]
            for i in sorted(best, key=lambda i: -logprobs[i]):
                text, raw = self._piece(int(i))
                tops.append(TopLogprob(text, float(logprobs[i]), raw))
        text, raw = self._piece(token)
        entry = TokenLogprob(text, float(logprobs[int(token)]), raw, tops)
        with self._lock:
            self._entries.append(entry)

    def drain(self) -> list[TokenLogprob]:
        """Entries recorded since the last drain."""
        with self._lock:
            new = self._entries[self._taken:]
            self._taken = len(self._entries)
        return new

    def all(self) -> list[TokenLogprob]:
        with self._lock:
            return list(self._entries)

"""A scripted backend: a real implementation of :class:`backends.Backend` that replays
given tokens, delays and failures, for driving the gateway in-process.

It is a test double at the backend boundary, not a mock of the gateway: the gateway
calls it exactly as it calls llama.cpp or an OpenAI upstream, and it behaves as they do
where the gateway can tell: it counts the prompt as processed before the first token,
updates ``request.progress`` token by token (energy attribution reads it), stops at
``max_tokens`` with ``finish_reason="length"``, puts usage on the last chunk, stops
generating when its stream is closed, and raises :class:`BackendError` subclasses.

What each request gets is a :class:`Script`, given per backend as a list (one script per
request, in order; the last one repeats), a single script, or a callable
``request -> Script``. Every :class:`GenerationRequest` received is recorded.
"""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from backends import (
    Backend,
    BackendError,
    BackendFailure,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    Chunk,
    Generation,
    GenerationRequest,
    Health,
    Usage,
)
from backends.base import EmbeddingRequest, Embeddings
from backends.features import TokenLogprob, ToolCall, ToolCallDelta, TopLogprob


@dataclass
class Script:
    """What one request gets from the backend."""

    #: Text pieces, one completion token each.
    tokens: Sequence[str] = ("Hello", ",", " world", ".")
    #: Prompt tokens the backend reports having processed.
    prompt_tokens: int = 10
    #: Seconds before the first token (prefill) and before each later token.
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    #: Raised after ``fail_after`` tokens were produced (0: before the first token).
    fail: BackendError | None = None
    fail_after: int = 0
    finish_reason: str = "stop"
    #: Calls the model makes after its text (then ``finish_reason`` is ``tool_calls``);
    #: streamed as deltas: the id and name first, then the arguments in two pieces, one
    #: completion token each.
    tool_calls: Sequence[ToolCall] = ()
    #: The log-probability each token reports (when the request asks for log-probabilities).
    logprob: float = -0.25
    #: Per-token log-probabilities, first token first, instead of ``logprob`` (tokens past
    #: its end report ``logprob``).
    token_logprobs: Sequence[float] = ()
    #: When the request scores its prompt (``prompt_logprobs``): the log-probability of each
    #: token of the request's own text, and of the scripted chat template's tokens around it.
    prompt_logprob: float = -0.5
    template_logprob: float = -0.01

    @classmethod
    def unavailable(cls, message: str = "scripted: no slot free", retry_after_s: float | None = None,
                    **kw) -> Script:
        return cls(fail=BackendUnavailable(message, retry_after_s), fail_after=0, **kw)

    @classmethod
    def timeout(cls, message: str = "scripted: no answer in time", **kw) -> Script:
        return cls(fail=BackendTimeout(message), fail_after=0, **kw)

    @classmethod
    def rejected(cls, message: str = "scripted: prompt exceeds the context",
                 param: str | None = "messages", **kw) -> Script:
        return cls(fail=BackendRejected(message, param), fail_after=0, **kw)

    @classmethod
    def broken_after(cls, n: int, message: str = "scripted: upstream dropped the connection",
                     **kw) -> Script:
        return cls(fail=BackendFailure(message), fail_after=n, **kw)


ScriptSource = Script | Sequence[Script] | Callable[[GenerationRequest], Script] | None


@dataclass
class StreamRecord:
    """What happened to one stream this backend produced."""

    request: GenerationRequest
    tokens_sent: int = 0
    finished: bool = False  # the final chunk was produced
    closed_early: bool = False  # closed (aclose/cancel) before the final chunk


@dataclass
class Calls:
    starts: int = 0
    closes: int = 0
    requests: list[GenerationRequest] = field(default_factory=list)
    streams: list[StreamRecord] = field(default_factory=list)
    embeddings: list[EmbeddingRequest] = field(default_factory=list)


def scripted_vector(text: str | list[int], size: int) -> list[float]:
    """A deterministic unit vector for ``text``: texts sharing words get similar vectors."""
    words = text.lower().split() if isinstance(text, str) else [str(t) for t in text]
    vector = [0.0] * size
    for word in words:
        vector[sum(word.encode()) % size] += 1.0
    norm = sum(x * x for x in vector) ** 0.5 or 1.0
    return [x / norm for x in vector]


def halves(call: ToolCall) -> tuple[str, str]:
    """A scripted call's arguments as the two tokens it streams them in."""
    half = len(call.arguments) // 2
    return call.arguments[:half], call.arguments[half:]


def scripted_logprobs(pieces: Sequence[str], request: GenerationRequest, logprob: float = -0.25,
                      per_token: Sequence[float] = (), start: int = 0
                      ) -> list[TokenLogprob] | None:
    """The tokens' log-probabilities as the scripted model reports them, when asked:
    ``logprob`` (the script's, default -0.25) each, or ``per_token[i]`` for the answer's
    ``i``-th token (``pieces`` start at token ``start``), with ``top_logprobs`` alternatives
    (the token itself, then ``alt1``, ``alt2``...)."""
    if not request.logprobs:
        return None
    top = request.top_logprobs or 0
    values = [per_token[start + j] if start + j < len(per_token) else logprob
              for j in range(len(pieces))]
    return [TokenLogprob(p, v, list(p.encode()),
                         [TopLogprob(p, v, list(p.encode()))]
                         + [TopLogprob(f"alt{i}", -1.0 - i, list(f"alt{i}".encode()))
                            for i in range(1, top)] if top else [])
            for p, v in zip(pieces, values, strict=True)]


def scripted_prompt_scores(request: GenerationRequest, script: Script) -> list[TokenLogprob]:
    """The prompt's last ``request.prompt_logprobs`` tokens with their scores, as a real
    backend renders and scores them: a chat's turns in a template (``<|role|>`` tokens),
    one token per word or run of spaces."""
    def scored(text: str, logprob: float) -> list[TokenLogprob]:
        return [TokenLogprob(p, logprob, list(p.encode())) for p in re.findall(r"\S+|\s+", text)]

    if request.messages is None:
        tokens = scored(request.prompt or "", script.prompt_logprob)
    else:
        tokens = []
        for m in request.messages:
            tokens += scored(f"<|{m['role']}|>\n", script.template_logprob)
            tokens += scored(m["content"] or "", script.prompt_logprob if m["role"] == "user"
                             else script.template_logprob)
            tokens += scored("<|end|>\n", script.template_logprob)
        tokens += scored("<|assistant|>\n", script.template_logprob)
    return tokens[-request.prompt_logprobs:]


class ScriptedBackend(Backend):
    kind = "scripted"

    def __init__(self, name: str, scripts: ScriptSource = None, healthy: bool = True):
        super().__init__(name)
        self._scripts = scripts
        self._served = 0
        self.healthy = healthy
        self.calls = Calls()
        #: Requests generating right now (for tests of concurrency and cancellation).
        self.active = 0
        #: What :meth:`context_window` says (None: not known, as for an HTTP upstream).
        self.window: int | None = None

    # -- what a request gets ------------------------------------------------------------

    def script_for(self, request: GenerationRequest) -> Script:
        source = self._scripts
        index = self._served
        self._served += 1
        if source is None:
            return Script()
        if isinstance(source, Script):
            return source
        if callable(source):
            return source(request)
        if not source:
            return Script()
        return source[min(index, len(source) - 1)]

    @property
    def requests(self) -> list[GenerationRequest]:
        return self.calls.requests

    def _receive(self, request: GenerationRequest) -> Script:
        # A copy of what the gateway sent, as it was when sent (progress is shared and mutates).
        seen = copy.copy(request)
        seen.messages = copy.deepcopy(request.messages)
        seen.progress = Usage()
        self.calls.requests.append(seen)
        return self.script_for(request)

    # -- the Backend interface ----------------------------------------------------------

    async def start(self) -> None:
        self.calls.starts += 1

    def context_window(self) -> int | None:
        return self.window

    async def close(self) -> None:
        self.calls.closes += 1

    async def health(self) -> Health:
        return Health(self.healthy, "scripted" if self.healthy else "scripted: down")

    async def complete(self, request: GenerationRequest) -> Generation:
        script = self._receive(request)
        pieces = []
        finish = script.finish_reason
        tokens = self._generate(request, script)
        try:
            async for piece, last_finish in tokens:
                pieces.append(piece)
                finish = last_finish or finish
        finally:
            await tokens.aclose()
        if script.tool_calls and finish != "length":
            request.progress.completion_tokens += 2 * len(script.tool_calls)
            # as llama.cpp's: the calls' tokens too, after the text's
            return Generation("".join(pieces), "tool_calls",
                              Usage(request.progress.prompt_tokens,
                                    request.progress.completion_tokens),
                              tool_calls=list(script.tool_calls),
                              logprobs=scripted_logprobs(
                                  pieces + [p for c in script.tool_calls for p in halves(c)],
                                  request, script.logprob, script.token_logprobs))
        return Generation("".join(pieces), finish, Usage(request.progress.prompt_tokens,
                                                         request.progress.completion_tokens),
                          logprobs=scripted_logprobs(pieces, request, script.logprob,
                                                         script.token_logprobs))

    #: The size of :meth:`embed`'s vectors when a request gives no ``dimensions``.
    embedding_size = 8

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """Embeddings as a real backend answers them: one :func:`scripted_vector` per input,
        one prompt token per word (or token id). A script's ``fail`` (at 0) and
        ``first_token_delay_s`` apply."""
        seen = copy.copy(request)
        seen.inputs = copy.deepcopy(request.inputs)
        seen.progress = Usage()
        self.calls.embeddings.append(seen)
        script = self.script_for(GenerationRequest(model=request.model))
        self.active += 1
        try:
            if script.first_token_delay_s:
                await asyncio.sleep(script.first_token_delay_s)
            if script.fail is not None and script.fail_after == 0:
                raise script.fail
        finally:
            self.active -= 1
        size = request.dimensions or self.embedding_size
        tokens = sum(len(t.split()) if isinstance(t, str) else len(t) for t in request.inputs)
        request.progress.prompt_tokens = tokens
        return Embeddings([scripted_vector(t, size) for t in request.inputs], tokens)

    def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        script = self._receive(request)
        record = StreamRecord(request)
        self.calls.streams.append(record)
        return self._stream(request, script, record)

    async def _stream(self, request: GenerationRequest, script: Script,
                      record: StreamRecord) -> AsyncIterator[Chunk]:
        tokens = self._generate(request, script)
        scoring = request.prompt_logprobs > 0
        try:
            async for piece, finish in tokens:
                if scoring:  # the prompt is read: its scores come first, on their own
                    scoring = False
                    yield Chunk(prompt_logprobs=scripted_prompt_scores(request, script))
                record.tokens_sent += 1 if piece else 0
                logprobs = scripted_logprobs([piece], request, script.logprob,
                                             script.token_logprobs, record.tokens_sent - 1)
                if finish is None:
                    yield Chunk(text=piece, logprobs=logprobs)
                elif script.tool_calls and finish != "length":
                    if piece:
                        yield Chunk(text=piece, logprobs=logprobs)
                    at = record.tokens_sent  # the index of the calls' first token
                    for i, call in enumerate(script.tool_calls):
                        yield Chunk(tool_calls=[ToolCallDelta(i, call.id, call.name)])
                        for part in halves(call):
                            request.progress.completion_tokens += 1
                            # as llama.cpp's: a call's tokens' log-probabilities on its deltas
                            yield Chunk(tool_calls=[ToolCallDelta(i, arguments=part)],
                                        logprobs=scripted_logprobs(
                                            [part], request, script.logprob,
                                            script.token_logprobs, at))
                            at += 1
                    record.finished = True
                    yield Chunk(finish_reason="tool_calls",
                                usage=Usage(request.progress.prompt_tokens,
                                            request.progress.completion_tokens))
                else:
                    record.finished = True
                    yield Chunk(text=piece, finish_reason=finish, logprobs=logprobs,
                                usage=Usage(request.progress.prompt_tokens,
                                            request.progress.completion_tokens))
        finally:
            if not record.finished:
                record.closed_early = True
            await tokens.aclose()  # stop generating now, as a real backend frees its slot

    async def _generate(self, request: GenerationRequest, script: Script):
        """``(piece, finish_reason or None)`` per token; the last one carries the reason."""
        self.active += 1
        try:
            tokens = list(script.tokens)
            finish = script.finish_reason
            if request.max_tokens is not None and len(tokens) > request.max_tokens:
                tokens, finish = tokens[:request.max_tokens], "length"
            if script.first_token_delay_s:
                await asyncio.sleep(script.first_token_delay_s)
            if script.fail is not None and script.fail_after == 0:
                raise script.fail
            request.progress.prompt_tokens = script.prompt_tokens
            if not tokens:
                yield "", finish
                return
            for i, piece in enumerate(tokens):
                if i and script.token_delay_s:
                    await asyncio.sleep(script.token_delay_s)
                request.progress.completion_tokens += 1
                produced = i + 1
                if script.fail is not None and script.fail_after == produced:
                    yield piece, None
                    raise script.fail
                yield piece, finish if produced == len(tokens) else None
        finally:
            self.active -= 1

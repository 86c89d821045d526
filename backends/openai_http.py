"""Any OpenAI-compatible HTTP upstream (vLLM, llama.cpp server, TGI, OpenAI itself).

One pooled :class:`aiohttp.ClientSession` per backend. Three timeouts: connect, first
byte (response headers, and for streams the first SSE event), and total. Upstream failures
become :mod:`backends.base` errors; the upstream's own error text is kept when it is a
client mistake (4xx) and replaced by a neutral message otherwise.

A request whose connection breaks before any byte of the answer came (reset, or closed by
the server) is sent once more, on a new connection: that is the race every HTTP/1.1 client
meets when it reuses a kept-alive connection just as the server closes it for idling
(llama-server and vLLM's uvicorn close idle ones after 5 s; the anchor benchmark met it).
OpenAI's own SDK retries such connection errors too. What the upstream may have done with
a request whose connection broke is not known to the gateway, and not billed.

Why aiohttp and not httpx: on this path the client is most of the gateway's cost. Measured
against the fast fake upstream on one core (CPU per request, ``benchmarks/overhead.py``'s
set-up): httpx 0.28 887 µs sequential and 2,263 µs at 32 concurrent requests (its pool
re-checks every connection on each request), aiohttp 168 µs and 106 µs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson
from pydantic import Field

from .base import (
    Backend,
    BackendFailure,
    BackendInvalidResponse,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    Chunk,
    ContextWindowExceeded,
    EmbeddingRequest,
    Embeddings,
    FeatureUnsupported,
    Generation,
    GenerationRequest,
    Health,
    Usage,
    context_window_message,
)
from .embeddings_wire import Malformed as MalformedEmbeddings
from .embeddings_wire import embeddings_body, parse_embeddings
from .features import TokenLogprob, ToolCallDelta
from .kind import BackendKind, Capabilities, Settings
from .openai_features import (
    WireFormatError,
    completion_extras,
    event_extras,
    merge_deltas,
    request_fields,
    wants_extras,
)

log = logging.getLogger("joulegate.openai")

#: Fields whose refusal (a 400 naming the field) says the upstream's model lacks a feature
#: the kind offers, not that the request is wrong: :class:`FeatureUnsupported`.
FEATURE_PARAMS = frozenset({"suffix"})

#: An HTTP(S) base URL, e.g. ``http://10.0.0.5:8000/v1``.
URL_PATTERN = r"^https?://[^\s/]+(/\S*)?$"


class Timeouts(Settings):
    connect_s: float = Field(5.0, gt=0, le=600)
    #: Until the upstream's response headers (non-streaming: the whole body) or first SSE event.
    first_byte_s: float = Field(60.0, gt=0, le=3600)
    total_s: float = Field(600.0, gt=0, le=86400)


class OpenAISettings(Settings):
    """Any OpenAI-compatible HTTP upstream: vLLM, llama.cpp server, TGI, OpenAI itself."""

    #: Base URL including the API prefix, e.g. ``http://10.0.0.5:8000/v1``.
    base_url: str = Field(pattern=URL_PATTERN)
    #: Literal key, or ``env:VAR``. Sent as ``Authorization: Bearer``.
    api_key: str | None = None
    timeouts: Timeouts = Timeouts()
    max_connections: int = Field(256, ge=1, le=100_000)
    #: The field a chat request's token limit is sent in. ``max_tokens`` is what vLLM,
    #: llama.cpp's server and TGI read; OpenAI's reasoning models (o1, o3, gpt-5, ...)
    #: refuse it with 400 ``unsupported_parameter`` and read only ``max_completion_tokens``,
    #: which OpenAI's other chat models read too. The gateway sets a limit even when the
    #: client gave none (a budget's ``default_max_tokens``), so a tier on such a model needs
    #: ``max_completion_tokens``. Text completions always send ``max_tokens`` (their only one).
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"


def _resolve_secret(value: str | None) -> str | None:
    if value and value.startswith("env:"):
        return os.environ.get(value[4:]) or None
    return value


def _context_overflow(err: dict[str, Any], message: str) -> bool:
    """An upstream's 400 that says the prompt does not fit: OpenAI's code, llama-server's
    type, or the words OpenAI and vLLM use."""
    return (err.get("code") == "context_length_exceeded"
            or err.get("type") == "exceed_context_size_error"
            or "maximum context length" in message.lower())


def _reason(exc: aiohttp.ClientError) -> str:
    """An aiohttp error in a few words: its class, and the system's words for an OS error
    (``ClientOSError: Connection reset by peer``)."""
    name = type(exc).__name__
    return f"{name}: {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else name


_MAX_EVENT_BYTES = 1 << 20
#: More tokens than any upstream reports for one request: a larger count is garbage.
_MAX_TOKEN_COUNT = 1 << 31


# -- what comes back, validated ------------------------------------------------------------
#
# An upstream's answer is checked for exactly the fields the gateway reads, with their
# types; anything else in it is ignored. A wrong type is never relayed or coerced: it is a
# BackendInvalidResponse (502 ``upstream_invalid_response`` before the first byte, an error
# event mid-stream). The checks are plain isinstance tests: this is the hot path.


class Malformed(ValueError):
    """What is wrong with an upstream's answer (safe to show a client)."""


def parse_usage(value: object) -> Usage | None:
    """``usage``: absent or null (``None``), or an object of token counts."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Malformed(f"usage is a {type(value).__name__}, not an object")
    counts = []
    for key in ("prompt_tokens", "completion_tokens"):
        n = value.get(key)
        if n is None:
            n = 0
        elif type(n) is not int or not 0 <= n < _MAX_TOKEN_COUNT:
            raise Malformed(f"usage.{key} is not a token count")
        counts.append(n)
    return Usage(counts[0], counts[1])


def _optional_str(value: object, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise Malformed(f"{what} is a {type(value).__name__}, not a string")


def _choice_text(choice: object, chat: bool, key: str) -> tuple[str | None, str | None]:
    """One choice's text (``message``/``delta`` content for chat) and finish reason."""
    if not isinstance(choice, dict):
        raise Malformed(f"a choice is a {type(choice).__name__}, not an object")
    finish = _optional_str(choice.get("finish_reason"), "finish_reason")
    if not chat:
        return _optional_str(choice.get("text"), "text"), finish
    message = choice.get(key)
    if message is None:
        return None, finish
    if not isinstance(message, dict):
        raise Malformed(f"{key} is a {type(message).__name__}, not an object")
    return _optional_str(message.get("content"), f"{key}.content"), finish


def _object(payload: bytes, what: str) -> dict[str, Any]:
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise Malformed(f"{what} is not JSON") from None
    if not isinstance(data, dict):
        raise Malformed(f"{what} is a JSON {type(data).__name__}, not an object")
    return data


def parse_completion(raw: bytes, chat: bool) -> tuple[str, str, Usage | None]:
    """A whole (non-streamed) answer: its text, finish reason and usage.
    Raises :class:`Malformed`."""
    data = _object(raw, "the completion")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise Malformed("the completion has no choices")
    text, finish = _choice_text(choices[0], chat, "message")
    return text or "", finish or "stop", parse_usage(data.get("usage"))


@dataclass(slots=True)
class Event:
    """One SSE ``data:`` event of a stream, validated."""

    texts: list[str]
    finish: str | None
    usage: Usage | None
    #: The upstream reported an error instead of a chunk.
    error: bool = False


def parse_event(payload: bytes, chat: bool) -> Event:
    """One streamed chunk (the JSON after ``data:``). Raises :class:`Malformed`."""
    data = _object(payload, "an event")
    if "error" in data:
        return Event([], None, None, error=True)
    choices = data.get("choices")
    if choices is None:
        choices = []
    elif not isinstance(choices, list):
        raise Malformed(f"choices is a {type(choices).__name__}, not a list")
    texts: list[str] = []
    finish = None
    for choice in choices:
        text, reason = _choice_text(choice, chat, "delta")
        if text:
            texts.append(text)
        finish = reason or finish
    return Event(texts, finish, parse_usage(data.get("usage")))


class _StreamState:
    """What one relayed stream has seen so far."""

    def __init__(self, request: GenerationRequest, name: str):
        self.request = request
        self.name = name
        self.alive = False  # any event yet: until then the first-byte deadline applies
        self.finish: str | None = None
        self.usage: Usage | None = None
        self.text_events = 0
        #: Tool-call pieces and log-probabilities not yet relayed (parsed only when asked for).
        self.extras = wants_extras(request)
        self.tool_calls: list[ToolCallDelta] = []
        self.logprobs: list[TokenLogprob] = []

    def take_chunk(self, texts: list[str]) -> Chunk | None:
        """The chunk for what one network read brought, or ``None`` if nothing."""
        if not (texts or self.tool_calls or self.logprobs):
            return None
        chunk = Chunk(text="".join(texts), tool_calls=merge_deltas(self.tool_calls) or None,
                      logprobs=self.logprobs or None)
        self.tool_calls, self.logprobs = [], []
        return chunk

    def feed(self, line: bytes, texts: list[str]) -> bool:
        """Take one SSE line, appending any text to ``texts``. True at ``[DONE]``, and when
        the upstream goes past ``max_tokens`` (``request.overran``): nothing more is relayed."""
        if not line.startswith(b"data:"):
            return False
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return True
        self.alive = True
        request = self.request
        try:
            event = parse_event(payload, request.is_chat)
        except Malformed as exc:
            raise BackendInvalidResponse(f"upstream '{self.name}' sent an invalid event: "
                                         f"{exc}") from None
        if event.error:
            raise BackendFailure(f"upstream '{self.name}' reported an error mid-stream")
        if self.extras:
            try:
                deltas, logprobs = event_extras(payload, request.is_chat)
            except WireFormatError as exc:
                raise BackendInvalidResponse(f"upstream '{self.name}' sent an invalid event: "
                                             f"{exc}") from None
            self.tool_calls += deltas
            self.logprobs += logprobs
        progress, limit = request.progress, request.max_tokens
        if event.usage is not None:
            usage = event.usage
            if limit is not None and usage.completion_tokens > limit:
                request.overran = True  # charged at most what was asked for
                usage.completion_tokens = limit
            self.usage = usage
            progress.prompt_tokens = usage.prompt_tokens
            progress.completion_tokens = usage.completion_tokens
        self.finish = event.finish or self.finish
        for text in event.texts:
            if limit is not None and self.text_events >= limit:
                request.overran = True  # the upstream ignores max_tokens: stop relaying
                self.finish = "length"
                return True
            self.text_events += 1
            if self.usage is None:
                progress.completion_tokens = self.text_events  # ~1 token per event
            texts.append(text)
        return False


class OpenAIBackend(Backend):
    kind = "openai"

    def __init__(self, name: str, settings: OpenAISettings):
        super().__init__(name)
        self.base_url = settings.base_url.rstrip("/")
        self.first_byte_s = settings.timeouts.first_byte_s
        self.total_s = settings.timeouts.total_s
        self._connect_s = settings.timeouts.connect_s
        self._max_connections = settings.max_connections
        self._max_tokens_field = settings.max_tokens_field
        headers = {"content-type": "application/json", "accept": "application/json"}
        key = _resolve_secret(settings.api_key)
        if key:
            headers["authorization"] = f"Bearer {key}"
        self._headers = headers
        self._client: aiohttp.ClientSession | None = None
        #: For the one retry of a request whose connection broke: never a pooled connection.
        self._fresh: aiohttp.ClientSession | None = None
        self._chat_url = f"{self.base_url}/chat/completions"
        self._completions_url = f"{self.base_url}/completions"
        self._embeddings_url = f"{self.base_url}/embeddings"

    async def start(self) -> None:
        # Read and total deadlines are enforced per request below, with asyncio.timeout.
        timeout = aiohttp.ClientTimeout(total=None, connect=self._connect_s,
                                        sock_connect=self._connect_s)
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30),
            timeout=timeout, headers=self._headers)
        self._fresh = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_connections, force_close=True),
            timeout=timeout, headers=self._headers)

    async def close(self) -> None:
        for session in (self._client, self._fresh):
            if session is not None:
                await session.close()
        self._client = self._fresh = None

    # -- request building -------------------------------------------------------------

    def _body(self, req: GenerationRequest, stream: bool) -> bytes:
        body: dict[str, Any] = {"model": req.model}
        if req.messages is not None:
            body["messages"] = req.messages
        else:
            body["prompt"] = req.prompt
        if req.max_tokens is not None:
            body[self._max_tokens_field if req.is_chat else "max_tokens"] = req.max_tokens
        for key in ("temperature", "top_p", "stop", "seed", "user"):
            value = getattr(req, key)
            if value is not None:
                body[key] = value
        body.update(request_fields(req))
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    def _url(self, req: GenerationRequest) -> str:
        return self._chat_url if req.is_chat else self._completions_url

    async def _send(self, req: GenerationRequest, stream: bool, deadline: float
                    ) -> aiohttp.ClientResponse:
        """Send and wait for the response headers (the first byte)."""
        return await self._post(self._url(req), self._body(req, stream), req.request_id,
                                deadline, "messages" if req.is_chat else "prompt")

    async def _post(self, url: str, body: bytes, request_id: str, deadline: float,
                    input_param: str = "input") -> aiohttp.ClientResponse:
        """POST ``body`` to ``url`` and wait for the response headers (the first byte)."""
        if self._client is None or self._fresh is None:
            raise BackendUnavailable(f"backend '{self.name}' is not started")
        budget = min(self.first_byte_s, deadline - time.monotonic())
        headers = {"x-request-id": request_id} if request_id else None
        try:
            async with asyncio.timeout(budget):
                try:
                    response = await self._client.post(url, data=body, headers=headers)
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                    if isinstance(exc, aiohttp.ClientConnectorError):
                        raise  # could not connect at all: nothing was sent
                    log.info("upstream '%s': the connection broke before the answer (%s); "
                             "sending request %s again on a new connection", self.name,
                             _reason(exc), request_id or "-")
                    response = await self._fresh.post(url, data=body, headers=headers)
        except aiohttp.ConnectionTimeoutError:
            raise BackendUnavailable(f"upstream '{self.name}' did not accept a connection within "
                                     f"{self._connect_s:g} s") from None
        except TimeoutError:
            raise BackendTimeout(f"upstream '{self.name}' sent no response within "
                                 f"{budget:.3g} s") from None
        except aiohttp.ClientConnectorError as exc:
            raise BackendUnavailable(f"upstream '{self.name}' is unreachable "
                                     f"({type(exc).__name__})") from None
        except aiohttp.ClientError as exc:
            raise BackendFailure(f"upstream '{self.name}' failed: {_reason(exc)}") from None
        if response.status >= 400:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                    raw = await response.read()
            except (TimeoutError, aiohttp.ClientError):
                raw = b""
            finally:
                response.release()
            raise self._status_error(response.status, raw, input_param)
        return response

    def _status_error(self, status: int, raw: bytes, input_param: str) -> Exception:
        detail, err = "", None
        try:
            err = orjson.loads(raw).get("error")
            detail = err.get("message", "") if isinstance(err, dict) else str(err or "")
        except (orjson.JSONDecodeError, AttributeError):
            pass
        if status == 400 and isinstance(err, dict) and _context_overflow(err, detail):
            window, used = err.get("n_ctx"), err.get("n_prompt_tokens")  # llama-server's
            message = (context_window_message(window, used, input_param == "messages")
                       if isinstance(window, int) and isinstance(used, int) else detail[:500])
            return ContextWindowExceeded(message, param=input_param)
        if status in (429, 503):
            return BackendUnavailable(f"upstream '{self.name}' is overloaded (HTTP {status})")
        if status == 504:
            return BackendTimeout(f"upstream '{self.name}' timed out (HTTP 504)")
        if status in (400, 413, 422) and detail:
            # The upstream's param is a field of the OpenAI body the gateway sent: the
            # client's own, or the name the gateway translated it to (max_tokens, tools).
            param = err.get("param") if isinstance(err, dict) else None
            param = param if isinstance(param, str) and param else None
            # A refused suffix: the upstream's model has no fill-in-the-middle (vLLM serves
            # it only where the model's renderer writes FIM prompts); another tier may.
            refused = FeatureUnsupported if param in FEATURE_PARAMS else BackendRejected
            return refused(f"upstream '{self.name}' rejected the request: {detail[:500]}",
                           param=param)
        # 401/403/404 mean the gateway's own upstream settings are wrong, not the client's.
        return BackendFailure(f"upstream '{self.name}' answered HTTP {status}")

    async def _read_all(self, response: aiohttp.ClientResponse, deadline: float) -> bytes:
        """A whole answer's body, by ``deadline``; the connection is released either way."""
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                return await response.read()
        except TimeoutError:
            raise BackendTimeout(f"upstream '{self.name}' did not finish within "
                                 f"{self.total_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise BackendFailure(f"upstream '{self.name}' failed mid-response: "
                                 f"{_reason(exc)}") from None
        finally:
            response.release()

    # -- the interface ------------------------------------------------------------------

    async def complete_raw(self, request: GenerationRequest) -> bytes:
        """A non-streamed request's answer as the upstream sent it, for a server's own fields
        (vLLM's ``prompt_logprobs``: :mod:`backends.vllm`)."""
        deadline = time.monotonic() + self.total_s
        response = await self._send(request, stream=False, deadline=deadline)
        return await self._read_all(response, deadline)

    async def complete(self, request: GenerationRequest) -> Generation:
        raw = await self.complete_raw(request)
        try:
            text, finish, usage = parse_completion(raw, request.is_chat)
        except Malformed as exc:
            raise BackendInvalidResponse(f"upstream '{self.name}' sent an invalid completion: "
                                         f"{exc}") from None
        usage = usage or Usage()
        limit = request.max_tokens
        if limit is not None and usage.completion_tokens > limit:
            # The upstream ignored max_tokens: its text is relayed (it cannot be cut by
            # tokens here), but no more than what was asked for (and reserved) is charged.
            request.overran = True
            usage.completion_tokens = limit
        request.progress.prompt_tokens = usage.prompt_tokens
        request.progress.completion_tokens = usage.completion_tokens
        calls, logprobs = None, None
        if wants_extras(request):
            try:
                calls, logprobs = completion_extras(raw, request.is_chat)
            except WireFormatError as exc:
                raise BackendInvalidResponse(f"upstream '{self.name}' sent an invalid "
                                             f"completion: {exc}") from None
        return Generation(text=text, finish_reason=finish,
                          usage=Usage(usage.prompt_tokens, usage.completion_tokens),
                          tool_calls=calls, logprobs=logprobs)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Relay the upstream's SSE stream. Every event that arrived in one network read
        becomes one chunk (their texts joined): a fast upstream costs one write per read
        instead of one per token, and a model streaming token by token is unchanged."""
        deadline = time.monotonic() + self.total_s
        response = await self._send(request, stream=True, deadline=deadline)
        if response.content_type != "text/event-stream":
            response.close()
            raise BackendInvalidResponse(
                f"upstream '{self.name}' answered a stream request with "
                f"'{response.content_type}', not an event stream")
        first_deadline = min(deadline, time.monotonic() + self.first_byte_s)
        state = _StreamState(request, self.name)
        complete = done = False
        buffer = b""
        try:
            while not complete:
                limit = deadline if state.alive else first_deadline
                try:
                    async with asyncio.timeout(max(limit - time.monotonic(), 0.001)):
                        data = await response.content.readany()
                except TimeoutError:
                    what = "completion" if state.alive else "first token"
                    raise BackendTimeout(f"upstream '{self.name}' did not send its {what} "
                                         "in time") from None
                except aiohttp.ClientError as exc:
                    raise BackendFailure(f"upstream '{self.name}' failed mid-stream: "
                                         f"{_reason(exc)}") from None
                if not data:
                    complete = True  # end of body
                    lines, buffer = [buffer], b""
                else:
                    *lines, buffer = (buffer + data).split(b"\n")
                    if len(buffer) > _MAX_EVENT_BYTES:
                        raise BackendFailure(f"upstream '{self.name}' sent an event over "
                                             f"{_MAX_EVENT_BYTES} bytes")
                texts: list[str] = []
                try:
                    for line in lines:
                        if state.feed(line, texts):
                            complete = done = True
                            break
                except BackendFailure:
                    # what came before the bad event is relayed, then the error
                    if (chunk := state.take_chunk(texts)) is not None:
                        yield chunk
                    raise
                if (chunk := state.take_chunk(texts)) is not None:
                    yield chunk
            if not done and state.finish is None:
                # The body ended with neither [DONE] nor a finish reason: cut short.
                raise BackendFailure(f"upstream '{self.name}' closed the stream before it "
                                     "finished")
        finally:
            if complete and not request.overran:
                response.release()
            else:  # a stream abandoned mid-way must not go back to the pool
                response.close()
        # Without upstream usage, one content event is about one token.
        yield Chunk(finish_reason=state.finish or "stop",
                    usage=state.usage or Usage(0, state.text_events))

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """``POST {base_url}/embeddings``; the answer is checked before it is relayed."""
        deadline = time.monotonic() + self.total_s
        response = await self._post(self._embeddings_url, embeddings_body(request),
                                    request.request_id, deadline)
        raw = await self._read_all(response, deadline)
        try:
            vectors, tokens = parse_embeddings(raw, len(request.inputs))
        except MalformedEmbeddings as exc:
            raise BackendInvalidResponse(f"upstream '{self.name}' sent invalid embeddings: {exc}"
                                 ) from None
        request.progress.prompt_tokens = tokens
        return Embeddings(vectors, tokens)

    async def health(self) -> Health:
        if self._client is None:
            return Health(False, "not started")
        try:
            async with asyncio.timeout(min(self.first_byte_s, 5.0)):
                async with self._client.get(f"{self.base_url}/models") as response:
                    status = response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            return Health(False, f"unreachable: {type(exc).__name__}")
        if status != 200:
            return Health(False, f"GET /models answered HTTP {status}")
        return Health(True, "ok")


KIND = BackendKind(OpenAIBackend.kind, OpenAISettings,
                   Capabilities(streaming=True, embeddings=True, tools=True,
                                structured_output=True, logprobs=True, insertion=True),
                   OpenAIBackend)

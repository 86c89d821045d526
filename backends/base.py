"""The one small interface every backend implements, and the values that cross it.

A backend turns a :class:`GenerationRequest` into text, either all at once
(:meth:`Backend.complete`) or as a stream of :class:`Chunk` (:meth:`Backend.stream`),
and reports the token counts it actually processed. Backends know nothing of HTTP
status codes, tenants or budgets: failures are raised as :class:`BackendError`
subclasses that say *what* went wrong, and the gateway decides how to answer.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from .features import ResponseFormat, TokenLogprob, ToolCall, ToolCallDelta, ToolChoice, ToolSpec


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class GenerationRequest:
    """One generation, already validated and stripped of everything gateway-specific."""

    model: str
    #: Chat messages in OpenAI's wire shape: ``{"role": ..., "content": str}``, plus an
    #: assistant's ``tool_calls`` (``[{"id", "type": "function", "function": {"name",
    #: "arguments": str}}]``, content may be ``None``) and a tool message's ``tool_call_id``
    #: (and optional ``name``). ``None`` for a plain completion.
    messages: list[dict[str, Any]] | None = None
    #: Prompt of a plain completion; ``None`` for chat.
    prompt: str | None = None
    #: Fill in the middle (a plain completion's OpenAI ``suffix``): the answer is the text
    #: that goes between ``prompt`` and this, as code editors ask for it. Kinds whose
    #: capabilities say ``insertion``.
    suffix: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    #: Opaque end-user id, forwarded to HTTP upstreams.
    user: str | None = None
    request_id: str = ""
    #: Functions the model may call (chat only); ``None``/empty: no tools.
    tools: list[ToolSpec] | None = None
    #: ``"none"``, ``"auto"``, ``"required"`` or one :class:`NamedToolChoice`; ``None`` means
    #: OpenAI's default (``auto`` with tools).
    tool_choice: ToolChoice | None = None
    #: Whether the model may make several calls in one turn; ``None``: OpenAI's default (yes).
    parallel_tool_calls: bool | None = None
    #: ``text`` (``None`` too), ``json_object`` or ``json_schema``.
    response_format: ResponseFormat | None = None
    #: Return each generated token's log-probability, with ``top_logprobs`` alternatives.
    logprobs: bool = False
    top_logprobs: int | None = None
    #: Score the prompt: the log-probability of each of its last ``prompt_logprobs`` tokens
    #: (0: none) under the model, read as the prompt is read. A stream's first chunk, before
    #: any text, carries them (:attr:`Chunk.prompt_logprobs`); so does the
    #: :class:`Generation`. Only kinds whose capabilities say ``prompt_logprobs`` do this.
    prompt_logprobs: int = 0
    #: Further OpenAI request fields (``presence_penalty``, ``logit_bias``, ``metadata``, ...),
    #: in OpenAI's spelling, for HTTP upstreams to forward as given; in-process backends
    #: use what they can of it (the gateway tells the client what they did not use).
    extra: dict[str, Any] = field(default_factory=dict)
    #: Tokens processed so far, updated by the backend while it works (from its worker
    #: thread for in-process backends); energy attribution reads it on every tick.
    progress: Usage = field(default_factory=Usage)
    #: Set by the backend when the upstream produced more completion tokens than
    #: ``max_tokens``: the backend stopped relaying there and reports at most ``max_tokens``.
    overran: bool = False

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


@dataclass(slots=True)
class Generation:
    """The result of :meth:`Backend.complete`."""

    text: str
    finish_reason: str
    usage: Usage
    #: The calls the model made (``finish_reason == "tool_calls"``); ``None``: none.
    tool_calls: list[ToolCall] | None = None
    #: Per-token log-probabilities, when the request asked for them.
    logprobs: list[TokenLogprob] | None = None
    #: The prompt's last tokens with their log-probabilities, when the request asked.
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class EmbeddingRequest:
    """One embeddings call, already validated: one vector is wanted per input, in order."""

    model: str
    #: Texts, or token-id lists (only an upstream sharing the client's tokenizer takes those).
    inputs: list[str] | list[list[int]]
    #: Output size, for models that can shorten their vectors; None: the model's own.
    dimensions: int | None = None
    #: Opaque end-user id, forwarded to HTTP upstreams.
    user: str | None = None
    request_id: str = ""
    #: Tokens processed so far (``prompt_tokens`` only); energy attribution reads it.
    progress: Usage = field(default_factory=Usage)


@dataclass(slots=True)
class Embeddings:
    """The result of :meth:`Backend.embed`: one float vector per input, in input order."""

    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(slots=True)
class Chunk:
    """One piece of a stream. The last chunk carries ``finish_reason`` and ``usage``."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    #: Pieces of tool calls; a call's pieces share its ``index`` and concatenate.
    tool_calls: list[ToolCallDelta] | None = None
    #: Log-probabilities of the tokens this chunk's text came from.
    logprobs: list[TokenLogprob] | None = None
    #: The prompt's scored tokens (``GenerationRequest.prompt_logprobs``): on a chunk of
    #: their own, the stream's first.
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class Load:
    """An upstream server's load, as last scraped (summed over its replicas)."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float | None = None
    prompt_tokens_total: float = 0.0
    generation_tokens_total: float = 0.0
    #: tokens per second over the last scrape interval
    prompt_tokens_per_s: float = 0.0
    generation_tokens_per_s: float = 0.0
    scraped_at: float = 0.0


@dataclass(slots=True)
class Health:
    ok: bool
    detail: str = ""
    info: dict[str, object] = field(default_factory=dict)


class BackendError(Exception):
    """Base of every failure a backend reports. The message is safe to show a client."""


class BackendUnavailable(BackendError):
    """Cannot take the request now: unreachable, overloaded, queue full or queue timeout."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendTimeout(BackendError):
    """The backend accepted the request but did not answer in time."""


class BackendFailure(BackendError):
    """The backend broke: an upstream 5xx, a malformed answer, a dropped connection."""


class BackendInvalidResponse(BackendFailure):
    """The upstream answered, but not in the OpenAI format: wrong types, not JSON, not SSE."""


class BackendInvalidOutput(BackendFailure):
    """The model's own output broke the request's contract: a tool call that does not parse
    or names no offered function, or JSON that does not match the requested schema. Nothing
    partial is returned; the message says what failed."""


class BackendRejected(BackendError):
    """The backend refused this request as invalid (e.g. the prompt exceeds its context)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextWindowExceeded(BackendRejected):
    """The prompt does not fit the model's context window. Clients act on this one (trim
    the conversation, or LiteLLM's ``context_window_fallbacks``): the gateway answers it as
    OpenAI does, 400 ``context_length_exceeded``."""


class FeatureUnsupported(BackendRejected):
    """The tier's model cannot do something its backend kind offers (fill in the middle, for
    a model without fill-in-the-middle tokens): the request is fine, the model is not the one
    for it. The gateway tries the next tier of the plan, which has the capability too, and
    answers this 400 naming ``param`` only when none is left."""


def context_window_message(window: int, used: int, chat: bool) -> str:
    """OpenAI's words for it, which clients match on (LiteLLM looks for "maximum context
    length")."""
    what = "messages" if chat else "prompt"
    return (f"This model's maximum context length is {window} tokens. However, your {what} "
            f"resulted in {used} tokens. Please reduce the length of the {what}.")


class Backend(abc.ABC):
    """A model server the gateway can send generations to.

    Lifecycle: :meth:`start` once (load weights, open pools), then any number of
    concurrent :meth:`complete`/:meth:`stream` calls, then :meth:`close` once.
    """

    #: The backend kind as written in policies (``llamacpp``, ``openai``).
    kind: str = ""

    def __init__(self, name: str):
        self.name = name

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load models / open connections. Called before the backend serves."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything :meth:`start` acquired."""

    @abc.abstractmethod
    async def complete(self, request: GenerationRequest) -> Generation:
        """Generate the whole answer."""

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Generate incrementally. Closing the iterator early (``aclose``) stops generation
        and frees whatever the request held. The final chunk carries usage."""

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """Embed ``request.inputs``, setting ``request.progress.prompt_tokens`` as it goes.
        Only kinds whose capabilities say ``embeddings`` serve it (default: refused)."""
        raise BackendRejected(f"backend '{self.name}' does not serve embeddings", param="model")

    @abc.abstractmethod
    async def health(self) -> Health:
        """Whether the backend can serve now."""

    def saturated(self) -> bool:
        """A load hint for routing: True when new requests would only queue (default: never)."""
        return False

    def context_window(self) -> int | None:
        """The most tokens one generation holds, prompt and output together, when known: no
        answer is longer, whatever ``max_tokens`` says (default: not known)."""
        return None

    def load(self) -> Load | None:
        """The server's queue depth and token rates, for metrics (default: not known)."""
        return None

    def own_fraction(self) -> float:
        """The gateway's share of the token work on this backend's hardware over the last
        interval: below 1.0 when other clients use the same server. Energy attribution
        charges only this share of a device's measured energy to the gateway's requests
        (default: 1.0, the gateway is the only client)."""
        return 1.0
